//! Zoho Accounts as a client inside a tunnel sees it: answered here, never forwarded. A
//! token request of any grant type gets a Zoho-shaped success with a placeholder token
//! (worthless outside the proxy, which replaces it with the real one on the way to Desk);
//! a revocation gets 200; anything else is refused. The real client secret, refresh token
//! and access token never reach the client.

use http::{Method, StatusCode};

/// What the local Accounts answers to a request for `path` with `method`: a status and a
/// JSON body; `None` for a request it refuses.
pub fn answer(
    method: &Method,
    path: &str,
    api_domain: &str,
) -> Option<(StatusCode, serde_json::Value)> {
    match path.trim_end_matches('/') {
        "/oauth/v2/token" if method == Method::POST => Some((
            StatusCode::OK,
            serde_json::json!({
                "access_token": placeholder(),
                "refresh_token": placeholder(),
                "expires_in": 3600,
                "api_domain": api_domain,
                "token_type": "Bearer",
            }),
        )),
        // Zoho's is a POST; whatever a client sends, there is nothing to revoke here.
        "/oauth/v2/token/revoke" => Some((StatusCode::OK, serde_json::json!({}))),
        _ => None,
    }
}

/// A token-shaped placeholder: `1000.` and random hex, marked as the proxy's own.
fn placeholder() -> String {
    format!(
        "1000.zohodeskproxy{:016x}.{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..),
        fastrand::u64(..)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_requests_get_a_placeholder_and_nothing_else_is_answered() {
        let (status, body) =
            answer(&Method::POST, "/oauth/v2/token", "https://www.zohoapis.com").unwrap();
        assert_eq!(status, StatusCode::OK);
        assert!(
            body["access_token"]
                .as_str()
                .unwrap()
                .starts_with("1000.zohodeskproxy")
        );
        assert_eq!(body["expires_in"], 3600);
        assert_eq!(body["token_type"], "Bearer");
        assert_eq!(body["api_domain"], "https://www.zohoapis.com");
        for method in [Method::POST, Method::GET, Method::DELETE] {
            assert_eq!(
                answer(&method, "/oauth/v2/token/revoke", "d").unwrap().0,
                StatusCode::OK,
                "{method}"
            );
        }
        assert!(answer(&Method::GET, "/oauth/v2/token", "d").is_none());
        assert!(answer(&Method::POST, "/oauth/v2/auth", "d").is_none());
        assert!(answer(&Method::POST, "/oauth/user/info", "d").is_none());
    }
}

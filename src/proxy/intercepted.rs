//! Transparent mode's ways into the request path: a `CONNECT` to a Zoho host, and the
//! requests for that host, inside its tunnel or as plain `http://` (README "Clients that
//! cannot change their URL").

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, Version};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;

use super::{ClientResponse, MAX_401_BODY, Proxy, Tunnel, TunnelRequest, Upstream, Via};
use crate::admin;
use crate::body::ResponseBody;
use crate::error::ProxyError;
use crate::intercept::{self, Intercept};
use crate::observe::RequestLog;
use crate::target;

/// A host transparent mode serves, as a request came for it: inside a tunnel (port 443),
/// or as a plain `http://` request (its scheme's port).
pub(super) struct Intercepted {
    /// The host, lower case.
    host: Arc<str>,
    /// The port the request's names may give.
    port: u16,
    /// What that host is.
    service: intercept::Service,
}

impl Proxy {
    /// Accepts a `CONNECT` to an intercepted Zoho host on port 443 (403 naming the host
    /// for any other: this is no open tunnel), under the access rules, with the client's
    /// key as `Proxy-Authorization`. The 200 carries the tunnel for the serving layer.
    pub(super) fn connect(
        &self,
        intercept: &Intercept,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<ResponseBody>, ProxyError> {
        // Python's http.client still says HTTP/1.0 on its CONNECT.
        if !matches!(req.version(), Version::HTTP_11 | Version::HTTP_10) {
            return Err(self
                .access
                .method_not_allowed("intercept: CONNECT is taken over HTTP/1.x only".into()));
        }
        // A client the address rules refuse learns nothing, not even the hosts served.
        self.access.check_peer(peer)?;
        let authority = req
            .uri()
            .authority()
            .cloned()
            .ok_or_else(|| ProxyError::BadRequest("CONNECT needs a host:port target".into()))?;
        let host = target::host_name(authority.as_str())?.to_ascii_lowercase();
        // Its `Host` names the target too, and clients differ on sending one (Python's
        // HTTP/1.0 CONNECT has none): one, when given, is parsed as strictly as any.
        target::check_host_headers(req.headers(), false)?;
        let intercepted = || intercept.hosts().join(", ");
        let Some(service) = intercept.service(&host) else {
            return Err(ProxyError::Forbidden(format!(
                "intercept: CONNECT to {host} refused: this proxy tunnels only to {} (it is not an open proxy)",
                intercepted()
            )));
        };
        if authority.port_u16() != Some(443) {
            return Err(ProxyError::Forbidden(format!(
                "intercept: CONNECT to {} refused: only port 443 of {} is tunnelled",
                authority.as_str(),
                intercepted()
            )));
        }
        self.access.check_connect_client(&req)?;
        let upgrade = hyper::upgrade::on(&mut req);
        tracing::info!(%peer, %host, "intercept: tunnel accepted");
        let mut response = Response::new(ResponseBody::full(Bytes::new()));
        response
            .extensions_mut()
            .insert(TunnelRequest(Arc::new(std::sync::Mutex::new(Some(
                Tunnel {
                    upgrade,
                    host: host.into(),
                    service,
                    tls: Arc::clone(&intercept.tls),
                },
            )))));
        Ok(response)
    }

    /// Whether a request is one of transparent mode's: inside a tunnel, or a plain
    /// `http://` one (absolute-form HTTP/1, on its scheme's default port) for a host it
    /// serves, sent to the proxy as to an HTTP proxy. The latter is served as inside a
    /// tunnel to that host, once it passed the checks of the `CONNECT` it did not make.
    pub(super) fn intercepted<B>(
        &self,
        req: &Request<B>,
        peer: SocketAddr,
        via: &Via,
    ) -> Result<Option<Intercepted>, ProxyError> {
        if let Via::Tunnel { host, service } = via {
            return Ok(Some(Intercepted {
                host: Arc::clone(host),
                port: 443,
                service: *service,
            }));
        }
        let Some(intercept) = &self.intercept else {
            return Ok(None);
        };
        let uri = req.uri();
        let Some(authority) = uri.authority().filter(|_| req.version() != Version::HTTP_2) else {
            return Ok(None);
        };
        let port = match uri.scheme_str() {
            Some("http") => 80,
            Some("https") => 443,
            _ => return Ok(None),
        };
        if authority.port_u16().is_some_and(|p| p != port) {
            return Ok(None);
        }
        let Ok(host) = target::host_name(authority.as_str()) else {
            return Ok(None);
        };
        let Some(service) = intercept.service(host) else {
            return Ok(None);
        };
        self.access.check_connect(req, peer)?;
        Ok(Some(Intercepted {
            host: host.to_ascii_lowercase().into(),
            port,
            service,
        }))
    }

    /// A request inside a tunnel: it must name the tunnel's host; Accounts' requests are
    /// answered here, Desk's go through the access rules (the client's key was checked on
    /// the CONNECT) and are forwarded as any other.
    pub(super) async fn tunneled(
        &self,
        upstream: &Upstream,
        req: Box<Request<Incoming>>,
        peer: SocketAddr,
        log: &mut RequestLog,
        to: Intercepted,
    ) -> Result<ClientResponse, ProxyError> {
        let Intercepted {
            ref host,
            port,
            service,
        } = to;
        let host: &str = host;
        // Every name the request gives (`Host`, the target's or `:authority`'s) must be
        // the host it came for, on that port or none.
        let names = req
            .headers()
            .get_all(http::header::HOST)
            .iter()
            .map(|h| h.to_str().unwrap_or(""))
            .chain(req.uri().authority().map(|a| a.as_str()));
        for named in names {
            let (name, named_port) = target::host_and_port(named)?;
            if !name.eq_ignore_ascii_case(host) || named_port.is_some_and(|p| p != port) {
                return Err(ProxyError::Forbidden(format!(
                    "intercept: a request for {host} names another host ({})",
                    named.chars().take(64).collect::<String>()
                )));
            }
        }
        let target = target::resolve(req.uri(), Version::HTTP_2, &self.config.upstream)?;
        if admin::is_local(target.path()) {
            return Err(ProxyError::Forbidden(format!(
                "intercept: {} is the proxy's own, not {host}'s",
                admin::PREFIX
            )));
        }
        match service {
            intercept::Service::Accounts => {
                self.access.check_peer(peer)?;
                let api_domain = self.intercept.as_ref().map_or("", |i| i.api_domain());
                let Some((status, body)) =
                    intercept::accounts::answer(req.method(), target.path(), api_domain)
                else {
                    return Err(ProxyError::Forbidden(format!(
                        "intercept: {host} is answered here for token requests only (POST /oauth/v2/token, /oauth/v2/token/revoke)"
                    )));
                };
                // The form (client id, secret, grant) is read and dropped: it is never
                // needed, and never forwarded.
                let _ = Limited::new(req.into_body(), MAX_401_BODY).collect().await;
                let mut text = body.to_string();
                text.push('\n');
                let mut response = Response::new(ResponseBody::full(Bytes::from(text)));
                *response.status_mut() = status;
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json;charset=UTF-8"),
                );
                Ok(Box::new(response))
            }
            intercept::Service::Desk => {
                self.access.check_tunneled(&req, peer, &target)?;
                self.forward(upstream, req, &target, log).await
            }
        }
    }
}

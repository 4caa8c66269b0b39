//! The configuration's validation: defaults, data centres, the environment, secrets in
//! files, and every error with its key and where it was set.

use std::path::Path;
use std::time::Duration;

use super::*;
use crate::url::BaseUrl;

const MINIMAL: &str = r#"
    [oauth]
    client_id = "1000.ID"
    client_secret = "secret"
    refresh_token = "1000.refresh"
"#;

#[test]
fn defaults_follow_the_spec() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.upstream.to_string(), "https://desk.zoho.com");
    assert_eq!(c.accounts_url.to_string(), "https://accounts.zoho.com");
    assert_eq!(c.oauth.refresh_margin, Duration::from_secs(300));
    assert_eq!(c.oauth.max_refreshes_per_10min, 5);
    assert_eq!(c.replay_body_bytes, 1_048_576);
    assert_eq!(c.buffered_body_bytes, 64 * 1_048_576);
    assert_eq!(c.timeouts.body_read, Duration::from_secs(30));
    assert_eq!(c.timeouts.connect, Duration::from_secs(10));
    assert_eq!(c.timeouts.response, Duration::from_secs(120));
    assert_eq!(c.timeouts.idle, Duration::from_secs(90));
    assert_eq!(c.token_file.as_deref(), Some(Path::new(DEFAULT_TOKEN_FILE)));
}

#[test]
fn data_centres_pick_their_hosts() {
    for (dc, accounts, desk) in [
        ("eu", "https://accounts.zoho.eu", "https://desk.zoho.eu"),
        (
            "ca",
            "https://accounts.zohocloud.ca",
            "https://desk.zohocloud.ca",
        ),
        (
            "com.au",
            "https://accounts.zoho.com.au",
            "https://desk.zoho.com.au",
        ),
    ] {
        let c = Config::from_toml(&format!("dc = \"{dc}\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.accounts_url.to_string(), accounts);
        assert_eq!(c.upstream.to_string(), desk);
    }
    let err = Config::from_toml(&format!("dc = \"mars\"\n{MINIMAL}")).unwrap_err();
    assert!(err.to_string().contains("`dc`"), "{err}");
}

#[test]
fn unknown_keys_are_named() {
    let err = Config::from_toml(&format!("lisen = \"x\"\n{MINIMAL}")).unwrap_err();
    assert!(err.to_string().contains("lisen"), "{err}");
    let err = Config::from_toml(&format!("{MINIMAL}\nrefresh_margin = 3")).unwrap_err();
    assert!(err.to_string().contains("refresh_margin"), "{err}");
}

#[test]
fn missing_credentials_name_key_and_env() {
    // The file to edit is the one read (`--config`), not always proxy.toml.
    let raw = RawConfig::from_toml("[oauth]\nclient_secret = \"s\"", "/etc/zdp/ci.toml").unwrap();
    let err = Config::try_from(raw).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`oauth.client_id` is required: set it in /etc/zdp/ci.toml or with the environment variable ZOHO_CLIENT_ID"
    );
    // No file at all: proxy.toml is where it would go.
    let mut raw = RawConfig::default();
    raw.apply_env(|name| (name == "ZOHO_CLIENT_SECRET").then(|| "s".into()));
    let err = Config::try_from(raw).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`oauth.client_id` is required: set it in proxy.toml or with the environment variable ZOHO_CLIENT_ID"
    );
}

#[test]
fn environment_overrides_the_file() {
    let mut raw = RawConfig::from_toml(MINIMAL, "t").unwrap();
    raw.apply_env(|name| match name {
        "ZOHO_PROXY_LISTEN" => Some("0.0.0.0:9000".into()),
        "ZOHO_CLIENT_SECRET" => Some("from-env".into()),
        "ZOHO_PROXY_API_KEYS" => Some("a, b,,c".into()),
        "ZOHO_TOKEN_FILE" => Some(String::new()),
        _ => None,
    });
    let c = Config::try_from(raw).unwrap();
    assert_eq!(c.listen.to_string(), "0.0.0.0:9000");
    assert_eq!(c.oauth.client_secret.expose(), "from-env");
    assert_eq!(c.access.api_keys.len(), 3);
    assert_eq!(c.token_file, None);
}

#[test]
fn the_token_store_and_the_client_id_may_come_from_files_named_by_variables() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::write(&store, "redis://:pw-in-a-secret@127.0.0.1:6379/0\n").unwrap();
    let id = dir.path().join("id");
    std::fs::write(&id, "1000.ID-FROM-FILE\n").unwrap();
    let (store, id) = (store.display().to_string(), id.display().to_string());
    // The file's forms.
    let text = format!(
        "token_store_file = \"{store}\"\n[oauth]\nclient_id_file = \"{id}\"\nclient_secret = \"s\"\n"
    );
    let c = Config::from_toml(&text).unwrap();
    assert_eq!(
        c.token_store.as_deref(),
        Some("redis://:pw-in-a-secret@127.0.0.1:6379/0")
    );
    assert_eq!(c.oauth.client_id, "1000.ID-FROM-FILE");
    // The variables' forms, over the file's inline values (ZOHO_CLIENT_ID_FILE had been
    // ignored).
    let text = "token_store = \"redis://other:6379/0\"\n[oauth]\nclient_id = \"inline\"\nclient_secret = \"s\"\n";
    let mut raw = RawConfig::from_toml(text, "proxy.toml").unwrap();
    raw.apply_env(|name| match name {
        "ZOHO_TOKEN_STORE_FILE" => Some(store.clone()),
        "ZOHO_CLIENT_ID_FILE" => Some(id.clone()),
        _ => None,
    });
    let c = Config::try_from(raw).unwrap();
    assert_eq!(
        c.token_store.as_deref(),
        Some("redis://:pw-in-a-secret@127.0.0.1:6379/0")
    );
    assert_eq!(c.oauth.client_id, "1000.ID-FROM-FILE");
    // Both forms in the file: an error, as for every secret.
    let text = format!(
        "token_store = \"redis://x:6379/0\"\ntoken_store_file = \"{store}\"\n[oauth]\nclient_id = \"i\"\nclient_secret = \"s\"\n"
    );
    let err = Config::from_toml(&text).unwrap_err().to_string();
    assert!(
        err.contains("not both") && !err.contains("pw-in-a-secret"),
        "{err}"
    );
}

#[test]
fn the_environment_overrides_both_forms_of_a_secret_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let from_env_file = dir.path().join("from-env");
    std::fs::write(&from_env_file, "env-file-value\n").unwrap();
    let env_file = from_env_file.display().to_string();
    // (the file's [oauth] lines, a variable and its value, the value taken)
    let base = "client_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n";
    for (file, var, value, taken) in [
        (
            "client_secret_file = \"cs.txt\"",
            "ZOHO_CLIENT_SECRET",
            "X",
            "X",
        ),
        ("client_id_file = \"id.txt\"", "ZOHO_CLIENT_ID", "I", "I"),
        (
            "refresh_token_file = \"rt.txt\"",
            "ZOHO_REFRESH_TOKEN",
            "R",
            "R",
        ),
        (
            "client_secret = \"s\"",
            "ZOHO_CLIENT_SECRET_FILE",
            &env_file,
            "env-file-value",
        ),
        (
            "refresh_token = \"r\"",
            "ZOHO_REFRESH_TOKEN_FILE",
            &env_file,
            "env-file-value",
        ),
    ] {
        // The file's key in place of the same key of `base`.
        let key = file.split(' ').next().unwrap().trim_end_matches("_file");
        let kept: Vec<&str> = base.lines().filter(|l| !l.starts_with(key)).collect();
        let text = format!("[oauth]\n{}\n{file}\n", kept.join("\n"));
        let mut raw = RawConfig::from_toml(&text, "proxy.toml").unwrap();
        raw.apply_env(|name| (name == var).then(|| value.to_owned()));
        let c = Config::try_from(raw).unwrap_or_else(|e| panic!("{var} over {file}: {e}"));
        let got = match key {
            "client_id" => c.oauth.client_id.clone(),
            "client_secret" => c.oauth.client_secret.expose().clone(),
            _ => c.oauth.refresh_token.unwrap().expose().clone(),
        };
        assert_eq!(got, taken, "{var} over {file}");
    }
    // The keys of the environment replace the file's key file as they replace its list.
    let mut raw = RawConfig::from_toml(
        &format!("{MINIMAL}\n[access]\napi_keys_file = \"keys.txt\"\n"),
        "proxy.toml",
    )
    .unwrap();
    raw.apply_env(|name| (name == "ZOHO_PROXY_API_KEYS").then(|| "a,b".to_owned()));
    assert_eq!(Config::try_from(raw).unwrap().access.api_keys.len(), 2);

    // Both forms in one source stay an error, named where they were given.
    let text = format!("{MINIMAL}\nclient_secret_file = \"{env_file}\"\n");
    let err = Config::try_from(RawConfig::from_toml(&text, "proxy.toml").unwrap())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "proxy.toml:4:21: `oauth.client_secret`: give either `oauth.client_secret` or `oauth.client_secret_file`, not both"
    );
    let mut raw = RawConfig::from_toml(MINIMAL, "proxy.toml").unwrap();
    raw.apply_env(|name| match name {
        "ZOHO_CLIENT_SECRET" => Some("X".into()),
        "ZOHO_CLIENT_SECRET_FILE" => Some(env_file.clone()),
        _ => None,
    });
    let err = Config::try_from(raw).unwrap_err().to_string();
    assert_eq!(
        err,
        "environment variable ZOHO_CLIENT_SECRET: `oauth.client_secret`: give either ZOHO_CLIENT_SECRET or ZOHO_CLIENT_SECRET_FILE, not both"
    );
}

#[test]
fn a_blank_credential_variable_is_an_error_that_names_it() {
    for (var, key) in [
        ("ZOHO_CLIENT_ID", "oauth.client_id"),
        ("ZOHO_CLIENT_SECRET", "oauth.client_secret"),
        ("ZOHO_REFRESH_TOKEN", "oauth.refresh_token"),
    ] {
        for blank in ["", "  "] {
            // The file has a value: the blank variable must not fall back to it.
            let mut raw = RawConfig::from_toml(MINIMAL, "proxy.toml").unwrap();
            raw.apply_env(|name| (name == var).then(|| blank.to_owned()));
            let err = Config::try_from(raw).unwrap_err();
            let text = err.to_string();
            assert_eq!(err.problems().len(), 1, "{text}");
            assert!(
                text.starts_with(&format!("environment variable {var}: `{key}`: "))
                    && text.contains(&format!("{var} is set but empty")),
                "{var}={blank:?}: {text}"
            );
        }
    }
    // Commands that never call Zoho need no credentials: a blank one is no problem.
    let mut raw = RawConfig::from_toml("", "proxy.toml").unwrap();
    raw.apply_env(|name| {
        ["ZOHO_CLIENT_ID", "ZOHO_CLIENT_SECRET", "ZOHO_REFRESH_TOKEN"]
            .contains(&name)
            .then(String::new)
    });
    raw.stand_in_credentials();
    assert!(Config::try_from(raw).is_ok());
}

#[test]
fn a_blank_api_keys_variable_is_an_error_never_no_keys() {
    for blank in ["", " ", ",", " , ,, "] {
        let mut raw = RawConfig::from_toml(
            &format!("{MINIMAL}\n[access]\napi_keys = [\"from-file\"]\n"),
            "t",
        )
        .unwrap();
        raw.apply_env(|name| (name == "ZOHO_PROXY_API_KEYS").then(|| blank.to_owned()));
        let err = Config::try_from(raw).unwrap_err();
        assert!(
            err.to_string().contains("ZOHO_PROXY_API_KEYS"),
            "{blank:?}: {err}"
        );
    }
}

#[test]
fn cidrs_that_cover_every_address_protect_nothing() {
    for (cidrs, open) in [
        ("[]", true),
        ("[\"0.0.0.0/0\"]", true),
        ("[\"::/0\"]", true),
        ("[\"0.0.0.0/0\", \"::/0\"]", true),
        ("[\"10.0.0.0/8\", \"0.0.0.0/0\"]", true),
        // Every IPv4 address through several entries, in any order, overlapping.
        ("[\"0.0.0.0/1\", \"128.0.0.0/1\"]", true),
        ("[\"128.0.0.0/1\", \"0.0.0.0/1\"]", true),
        (
            "[\"192.0.0.0/2\", \"0.0.0.0/2\", \"128.0.0.0/2\", \"64.0.0.0/2\"]",
            true,
        ),
        ("[\"0.0.0.0/1\", \"64.0.0.0/2\", \"128.0.0.0/1\"]", true),
        ("[\"0.0.0.0/1\", \"128.0.0.1/1\"]", true),
        ("[\"10.0.0.0/8\", \"0.0.0.0/1\", \"128.0.0.0/1\"]", true),
        // Every IPv6 address.
        ("[\"::/1\", \"8000::/1\"]", true),
        ("[\"10.0.0.0/8\", \"8000::/1\", \"::/1\"]", true),
        // Some address left out.
        ("[\"10.0.0.0/8\"]", false),
        ("[\"0.0.0.0/1\"]", false),
        ("[\"0.0.0.0/2\", \"64.0.0.0/2\", \"128.0.0.0/2\"]", false),
        ("[\"64.0.0.0/2\", \"128.0.0.0/1\"]", false),
        ("[\"0.0.0.0/1\", \"128.0.0.0/2\", \"192.0.0.0/3\"]", false),
        ("[\"::/1\", \"8000::/2\"]", false),
        // Halves of different families make no whole.
        ("[\"0.0.0.0/1\", \"8000::/1\"]", false),
        ("[\"::ffff:0:0/96\"]", false),
        (
            "[\"255.255.255.255/32\", \"0.0.0.0/1\", \"128.0.0.0/2\"]",
            false,
        ),
    ] {
        let c = Config::from_toml(&format!(
            "listen = \"0.0.0.0:8080\"\n{MINIMAL}\n[access]\nallow_cidrs = {cidrs}\n"
        ))
        .unwrap();
        assert_eq!(c.is_open_remote(), open, "{cidrs}");
    }
}

#[test]
fn secrets_can_come_from_files() {
    let dir = std::env::temp_dir().join(format!("zdp-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("secret");
    std::fs::write(&file, "file-secret\n").unwrap();
    let toml = format!(
        "[oauth]\nclient_id = \"id\"\nclient_secret_file = \"{}\"\nrefresh_token = \"r\"\n",
        file.display()
    );
    let c = Config::from_toml(&toml).unwrap();
    assert_eq!(c.oauth.client_secret.expose(), "file-secret");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_empty_secret_file_is_an_error_not_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("mounted-secret");
    std::fs::write(&empty, " \n\n").unwrap();
    let empty = empty.display();
    // A key file mounted empty must not turn the key check off.
    let keys = format!(
        "{MINIMAL}\n[access]\napi_keys_file = \"{empty}\"\nallow_cidrs = [\"127.0.0.0/8\"]"
    );
    let err = Config::from_toml(&keys).unwrap_err().to_string();
    assert!(
        err.contains("access.api_keys_file") && err.contains("is empty"),
        "{err}"
    );
    // Comments are no keys (an audit's `X-Proxy-Key: # comment` was let in), and a file
    // of comments alone is no keys at all.
    let commented = dir.path().join("commented");
    std::fs::write(
        &commented,
        "# the CI's key\nci-key-1234\n  # old: ci-key-0000\n",
    )
    .unwrap();
    let config =
        Config::from_toml(&keys.replace(&empty.to_string(), &commented.display().to_string()))
            .unwrap();
    let listed: Vec<&str> = config
        .access
        .api_keys
        .iter()
        .map(|k| k.expose().as_str())
        .collect();
    assert_eq!(listed, ["ci-key-1234"]);
    std::fs::write(&commented, "# no key yet\n").unwrap();
    let err =
        Config::from_toml(&keys.replace(&empty.to_string(), &commented.display().to_string()))
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("access.api_keys_file") && err.contains("holds no key"),
        "{err}"
    );
    for key in ["client_secret", "refresh_token"] {
        let toml = "[oauth]\nclient_id = \"id\"\nclient_secret = \"s\"\nrefresh_token = \"r\"\n"
            .replace(
                &format!("{key} = "),
                &format!("{key}_file = \"{empty}\"\n# "),
            );
        let err = Config::from_toml(&toml).unwrap_err().to_string();
        assert!(
            err.contains(&format!("oauth.{key}")) && err.contains("is empty"),
            "{err}"
        );
    }
}

#[test]
fn a_secret_file_that_cannot_be_read_is_named_with_its_place() {
    for (before, file_key) in [
        ("client_id = \"id\"", "client_secret_file"),
        (
            "client_id = \"id\"\nclient_secret = \"s\"",
            "refresh_token_file",
        ),
        ("client_secret = \"s\"", "client_id_file"),
    ] {
        for (value, says) in [
            ("/nonexistent/x", "cannot read the file /nonexistent/x"),
            ("", "names no file"),
        ] {
            let text = format!("[oauth]\n{before}\n{file_key} = \"{value}\"\n");
            let line = text.lines().count();
            let err = Config::try_from(RawConfig::from_toml(&text, "proxy.toml").unwrap())
                .unwrap_err()
                .to_string();
            let place = format!(
                "proxy.toml:{line}:{}: `oauth.{file_key}`: ",
                file_key.len() + 4
            );
            assert!(
                err.starts_with(&place) && err.contains(says),
                "{place} … {says} in {err}"
            );
        }
    }
    let err = Config::from_toml(&format!("{MINIMAL}\n[access]\napi_keys_file = \"\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`access.api_keys_file`: names no file"),
        "{err}"
    );
    // A path from the environment: the message names the variable.
    let mut raw = RawConfig::from_toml(
        "[oauth]\nclient_id = \"id\"\nclient_secret = \"s\"\n",
        "proxy.toml",
    )
    .unwrap();
    raw.apply_env(|name| (name == "ZOHO_REFRESH_TOKEN_FILE").then(|| "/nonexistent/x".into()));
    let err = Config::try_from(raw).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "environment variable ZOHO_REFRESH_TOKEN_FILE: `oauth.refresh_token_file`: cannot read"
        ),
        "{err}"
    );
}

#[test]
fn the_example_proxy_toml_is_complete_and_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let mut raw = RawConfig::from_file(&path).unwrap();
    raw.apply_env(|name| match name {
        "ZOHO_CLIENT_ID" => Some("id".into()),
        "ZOHO_CLIENT_SECRET" => Some("secret".into()),
        _ => None,
    });
    let example = Config::try_from(raw).unwrap();
    let defaults = Config::from_toml(MINIMAL).unwrap();
    assert_eq!(example.listen, defaults.listen);
    assert_eq!(example.upstream, defaults.upstream);
    assert_eq!(example.accounts_url, defaults.accounts_url);
    assert_eq!(example.token_file, defaults.token_file);
    assert_eq!(example.oauth.refresh_margin, defaults.oauth.refresh_margin);
    assert_eq!(
        example.oauth.max_refreshes_per_10min,
        defaults.oauth.max_refreshes_per_10min
    );
    assert_eq!(example.replay_body_bytes, defaults.replay_body_bytes);
    assert_eq!(example.buffered_body_bytes, defaults.buffered_body_bytes);
    assert_eq!(example.max_connections, defaults.max_connections);
    assert_eq!(
        example.max_upstream_requests,
        defaults.max_upstream_requests
    );
    assert_eq!(example.workers, defaults.workers);
    assert_eq!(
        format!("{:?}", example.timeouts),
        format!("{:?}", defaults.timeouts)
    );
    assert!(!example.access.allow_unauthenticated_remote);
    assert_eq!(example.desk.max_concurrent, defaults.desk.max_concurrent);
    assert_eq!(example.desk.edition, defaults.desk.edition);
    assert_eq!(example.desk.fleet_lease, defaults.desk.fleet_lease);
}

#[test]
fn desk_editions_set_the_concurrency_and_max_concurrent_overrides_them() {
    let c = Config::from_toml(MINIMAL).unwrap();
    assert_eq!((c.desk.edition, c.desk.max_concurrent), ("standard", 10));
    assert_eq!(c.desk.fleet_lease, Duration::from_secs(10));
    for (edition, limit) in [
        ("free", 5),
        ("express", 10),
        ("standard", 10),
        ("Professional", 15),
        ("enterprise", 25),
    ] {
        let c =
            Config::from_toml(&format!("{MINIMAL}\n[desk]\nedition = \"{edition}\"\n")).unwrap();
        assert_eq!(c.desk.max_concurrent, limit, "{edition}");
    }
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[desk]\nedition = \"free\"\nmax_concurrent = 3\n"
    ))
    .unwrap();
    assert_eq!(c.desk.max_concurrent, 3);
    let err = Config::from_toml(&format!("{MINIMAL}\n[desk]\nedition = \"platinum\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("desk.edition") && err.contains("platinum") && err.contains("enterprise"),
        "{err}"
    );
    let err = Config::from_toml(&format!("{MINIMAL}\n[desk]\nmax_concurrent = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("desk.max_concurrent") && err.contains("at least 1"),
        "{err}"
    );
    let err = Config::from_toml(&format!("{MINIMAL}\n[desk]\nfleet_lease_secs = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("desk.fleet_lease_secs"), "{err}");
}

#[test]
fn counts_of_zero_are_refused_by_name() {
    // MINIMAL ends inside [oauth].
    for (extra, key) in [
        (
            "max_refreshes_per_10min = 0",
            "oauth.max_refreshes_per_10min",
        ),
        ("[limits]\nmax_connections = 0", "limits.max_connections"),
        (
            "[limits]\nmax_upstream_requests = 0",
            "limits.max_upstream_requests",
        ),
    ] {
        let err = Config::from_toml(&format!("{MINIMAL}\n{extra}\n")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(key) && text.contains("at least 1"), "{text}");
    }
    let c = Config::from_toml(&format!("{MINIMAL}\n[limits]\nworkers = 3\n")).unwrap();
    assert_eq!(c.worker_threads(), 3);
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[limits]\nworkers = 8\nmax_upstream_requests = 2\n"
    ))
    .unwrap();
    assert_eq!(c.worker_threads(), 2, "each thread has a slot of its own");
    let c = Config::from_toml(MINIMAL).unwrap();
    assert!(c.worker_threads() >= 1, "0 means one per CPU");
}

#[test]
fn a_time_beyond_a_year_is_refused_by_name() {
    // A deadline computed from it would overflow the clock on the first request.
    let err = Config::from_toml(&format!("{MINIMAL}\n[timeouts]\nresponse_secs = 1e18\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("timeouts.response_secs") && err.contains("more than a year"),
        "{err}"
    );
}

#[test]
fn the_refresh_margin_takes_fractions_and_zero_within_a_year() {
    // MINIMAL ends inside [oauth].
    for (value, margin) in [
        ("1.5", Duration::from_millis(1500)),
        ("0", Duration::ZERO),
        ("0.0", Duration::ZERO),
        ("300", Duration::from_secs(300)),
    ] {
        let c = Config::from_toml(&format!("{MINIMAL}\nrefresh_margin_secs = {value}\n"))
            .unwrap_or_else(|e| panic!("{value}: {e}"));
        assert_eq!(c.oauth.refresh_margin, margin, "{value}");
    }
    for (value, says) in [
        ("-1", "is not a number of seconds"),
        ("nan", "is not a number of seconds"),
        ("1e10", "more than a year"),
    ] {
        let err = Config::from_toml(&format!("{MINIMAL}\nrefresh_margin_secs = {value}\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`oauth.refresh_margin_secs`: ") && err.contains(says),
            "{value}: {err}"
        );
    }
}

#[test]
fn a_bad_ca_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, "not a certificate").unwrap();
    for file in [path.display().to_string(), "/nonexistent/ca.pem".into()] {
        let err =
            Config::from_toml(&format!("{MINIMAL}\n[tls]\nca_file = \"{file}\"")).unwrap_err();
        assert!(err.to_string().contains("tls.ca_file"), "{err}");
    }
}

#[test]
fn upstream_keeps_its_prefix_and_joins_byte_for_byte() {
    let base = BaseUrl::parse("http://127.0.0.1:9000/desk/").unwrap();
    assert_eq!(base.prefix, "/desk");
    assert_eq!(base.port(), 9000);
    let uri = base.join("/api/v1/tickets?q=a%2Fb+c%20d").unwrap();
    assert_eq!(
        uri.to_string(),
        "http://127.0.0.1:9000/desk/api/v1/tickets?q=a%2Fb+c%20d"
    );
    assert!(BaseUrl::parse("ftp://x").is_err());
    assert!(BaseUrl::parse("desk.zoho.com").is_err());
}

#[test]
fn every_problem_is_reported_at_once_with_its_line_and_column() {
    let text = "listen = \"nowhere\"\ndc = \"mars\"\n\n[oauth]\nclient_id = \"id\"\nclient_secret = \"s\"\nmax_refreshes_per_10min = 0\n\n[access]\nallow_methods = [\"GETT\", \"GET\"]\nallow_cidrs = [\"10.0.0.0/33\"]\ndeny_paths = [\"api\"]\n";
    let err = Config::try_from(RawConfig::from_toml(text, "proxy.toml").unwrap()).unwrap_err();
    let problems: Vec<String> = err.problems().iter().map(|e| e.to_string()).collect();
    for expected in [
        "proxy.toml:1:10: `listen`",
        "proxy.toml:2:6: `dc`",
        "proxy.toml:7:27: `oauth.max_refreshes_per_10min`",
        "proxy.toml:10:17: `access.allow_methods`: \"GETT\"",
        "proxy.toml:11:15: `access.allow_cidrs`",
        "proxy.toml:12:14: `access.deny_paths`",
    ] {
        assert!(
            problems.iter().any(|p| p.starts_with(expected)),
            "{expected} missing in {problems:#?}"
        );
    }
    assert_eq!(problems.len(), 6, "{problems:#?}");
}

#[test]
fn an_open_listener_is_one_more_problem_of_the_list_when_serving() {
    let text = format!("listen = \"0.0.0.0:9\"\ndc = \"mars\"\n{MINIMAL}");
    let mut raw = RawConfig::from_toml(&text, "proxy.toml").unwrap();
    raw.to_serve(None);
    let err = Config::try_from(raw).unwrap_err();
    let problems: Vec<String> = err.problems().iter().map(|e| e.to_string()).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[0].starts_with("proxy.toml:2:6: `dc`"),
        "{problems:#?}"
    );
    assert!(
        problems[1].starts_with("proxy.toml:1:10: `listen`: 0.0.0.0:9 is reachable")
            && problems[1].contains("access.allow_unauthenticated_remote = true"),
        "{problems:#?}"
    );

    // `--listen` is where the address came from.
    let text = format!("dc = \"mars\"\n{MINIMAL}");
    let mut raw = RawConfig::from_toml(&text, "proxy.toml").unwrap();
    raw.to_serve(Some("0.0.0.0:9".parse().unwrap()));
    let err = Config::try_from(raw).unwrap_err();
    let problems: Vec<String> = err.problems().iter().map(|e| e.to_string()).collect();
    assert_eq!(problems.len(), 2, "{problems:#?}");
    assert!(
        problems[1].starts_with("option --listen: `listen`: 0.0.0.0:9 is reachable"),
        "{problems:#?}"
    );
    let mut raw = RawConfig::from_toml(MINIMAL, "proxy.toml").unwrap();
    raw.to_serve(Some("127.0.0.1:9".parse().unwrap()));
    assert_eq!(
        Config::try_from(raw).unwrap().listen.to_string(),
        "127.0.0.1:9"
    );

    // An access rule that is wrong is reported alone, not also as no rule at all.
    let text =
        format!("listen = \"0.0.0.0:9\"\n{MINIMAL}\n[access]\nallow_cidrs = [\"10.0.0.0/33\"]\n");
    let mut raw = RawConfig::from_toml(&text, "proxy.toml").unwrap();
    raw.to_serve(None);
    let err = Config::try_from(raw).unwrap_err();
    assert_eq!(err.problems().len(), 1, "{err}");
    assert!(err.to_string().contains("access.allow_cidrs"), "{err}");

    // Allowed explicitly; and commands that do not listen (exchange, ca init, env) are
    // not refused for it.
    let text = format!(
        "listen = \"0.0.0.0:9\"\n{MINIMAL}\n[access]\nallow_unauthenticated_remote = true\n"
    );
    let mut raw = RawConfig::from_toml(&text, "proxy.toml").unwrap();
    raw.to_serve(None);
    assert!(Config::try_from(raw).is_ok());
    assert!(Config::from_toml(&format!("listen = \"0.0.0.0:9\"\n{MINIMAL}")).is_ok());
}

#[test]
fn a_value_of_the_wrong_type_names_its_key_and_place() {
    let text =
        "[oauth]\nclient_id = \"id\"\nclient_secret = \"s\"\n[timeouts]\nconnect_secs = \"10\"\n";
    let err = RawConfig::from_toml(text, "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("proxy.toml:5:16: `timeouts.connect_secs`"),
        "{err}"
    );
    assert!(err.contains("string"), "{err}");
}

#[test]
fn a_secret_of_the_wrong_type_is_refused_without_its_value() {
    for (text, key) in [
        (
            "[oauth]\nclient_id = \"id\"\nclient_secret = 98765432109\n",
            "oauth.client_secret",
        ),
        (
            "[oauth]\nclient_id = \"id\"\nrefresh_token = 98765432109\n",
            "oauth.refresh_token",
        ),
        (
            "[access]\napi_keys = [\"k\", 98765432109]\n",
            "access.api_keys",
        ),
        // One key written as a string instead of a list.
        ("[access]\napi_keys = \"98765432109\"\n", "access.api_keys"),
    ] {
        let err = RawConfig::from_toml(text, "proxy.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains(key) && err.contains("expected a"), "{err}");
        assert!(!err.contains("98765432109"), "{err}");
    }
    // Text still reads as before.
    let raw = RawConfig::from_toml("[access]\napi_keys = [\"a\", \"b\"]\n", "proxy.toml").unwrap();
    assert_eq!(
        raw.access.api_keys,
        Some(vec!["a".to_owned(), "b".to_owned()])
    );
}

#[test]
fn a_syntax_error_has_its_line_and_column() {
    let err = RawConfig::from_toml("listen = \"x\"\n[oauth\nclient_id = 1\n", "proxy.toml")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("proxy.toml:2:"), "{err}");
}

#[test]
fn an_error_from_the_environment_names_the_variable() {
    let mut raw = RawConfig::from_toml(MINIMAL, "proxy.toml").unwrap();
    raw.apply_env(|name| (name == "ZOHO_DC").then(|| "mars".to_owned()));
    let err = Config::try_from(raw).unwrap_err().to_string();
    assert!(
        err.starts_with("environment variable ZOHO_DC: `dc`"),
        "{err}"
    );
}

#[test]
fn no_credentials_at_all_suggests_the_demo() {
    let err = Config::from_toml("").unwrap_err();
    let text = err.to_string();
    assert_eq!(err.problems().len(), 2, "{text}");
    assert!(
        text.contains("oauth.client_id") && text.contains("oauth.client_secret"),
        "{text}"
    );
    assert!(text.contains("zoho-desk-proxy demo"), "{text}");
}

#[test]
fn methods_the_proxy_never_forwards_cannot_be_allowed() {
    for method in ["TRACE", "CONNECT", "GETT", "get "] {
        let result = Config::from_toml(&format!(
            "{MINIMAL}\n[access]\nallow_methods = [\"{method}\"]\n"
        ));
        match method.trim() {
            "get" => assert!(result.is_ok()),
            _ => assert!(
                result
                    .unwrap_err()
                    .to_string()
                    .contains("access.allow_methods"),
                "{method}"
            ),
        }
    }
}

#[test]
fn rules_are_compiled_when_the_config_is_validated() {
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[access]\napi_keys = [\"a-key-of-the-proxy\"]\ndeny_paths = [\"/api/v1/%61gents\"]\nallow_hosts = [\"Zoho-Proxy:8080\", \"*\", \"::1\", \"[FD00:0::2]:8080\"]\nallow_cidrs = [\"10.1.2.3\"]\n"
    ))
    .unwrap();
    assert!(c.access.deny_paths[0].covers("/API/v1/agents/5"));
    // An IPv6 address bare (as the default's `::1` is written) or in brackets.
    assert_eq!(
        c.access.allow_hosts.as_deref(),
        Some(
            &[
                "zoho-proxy".to_owned(),
                "*".to_owned(),
                "::1".to_owned(),
                "fd00::2".to_owned()
            ][..]
        )
    );
    assert_eq!(c.access.allow_cidrs[0].to_string(), "10.1.2.3/32");
}

#[test]
fn a_token_store_url_redis_cannot_use_is_a_configuration_error() {
    for url in [
        "redis://:pw-secret@127.0.0.1:6379/notanumber",
        "redis://:pw-secret@127.0.0.1:notaport/0",
    ] {
        let err = Config::from_toml(&format!("token_store = \"{url}\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("token_store"), "{err}");
        assert!(!err.contains("pw-secret"), "{err}");
    }
    let c = Config::from_toml(&format!(
        "token_store = \"redis://:pw@127.0.0.1:6379/2\"\n{MINIMAL}"
    ))
    .unwrap();
    assert!(c.token_store.is_some());
}

#[test]
fn any_host_needs_api_keys() {
    // Without a key, the Host check is the only guard against DNS rebinding.
    let err = Config::from_toml(&format!("{MINIMAL}\n[access]\nallow_hosts = [\"*\"]\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("access.allow_hosts"), "{err}");
    assert!(err.contains("needs access.api_keys"), "{err}");
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[access]\nallow_hosts = [\"*\"]\napi_keys = [\"a-key-of-the-proxy\"]\n"
    ))
    .unwrap();
    assert_eq!(c.access.allow_hosts.as_deref(), Some(&["*".to_owned()][..]));
    // Or with the opt-in that already says anyone who reaches the proxy acts as its user.
    Config::from_toml(&format!(
        "{MINIMAL}\n[access]\nallow_hosts = [\"*\"]\nallow_unauthenticated_remote = true\n"
    ))
    .unwrap();
}

#[test]
fn intercept_hosts_are_dns_names_never_addresses() {
    for host in [
        "10.0.0.1",
        "::1",
        "[::1]",
        "desk..zoho.com",
        "-desk.zoho.com",
        "desk.zoho.com..",
        "localhost",
        "desk.zoho.com:443",
        "*.zoho.com",
    ] {
        let err = Config::from_toml(&format!("{MINIMAL}\n[intercept]\nhosts = [\"{host}\"]\n"))
            .unwrap_err();
        assert!(err.to_string().contains("intercept.hosts"), "{host}: {err}");
    }
    let c = Config::from_toml(&format!(
        "{MINIMAL}\n[intercept]\nhosts = [\"Desk.Example.COM.\", \"accounts.example.com\", \"desk-2.example.com\"]\n"
    ))
    .unwrap();
    assert!(
        c.intercept
            .desk_hosts
            .contains(&"desk.example.com".to_owned())
    );
    assert!(
        c.intercept
            .desk_hosts
            .contains(&"desk-2.example.com".to_owned())
    );
    assert!(
        c.intercept
            .accounts_hosts
            .contains(&"accounts.example.com".to_owned())
    );
}

#[test]
fn an_upstream_path_prefix_is_written_in_canonical_form() {
    for (prefix, says) in [
        ("/z%6Fho", "\"/zoho\""),
        ("/a/../b", "dot-segment"),
        ("/a;b", ";"),
        ("/a//b", "empty segment"),
    ] {
        let err = Config::from_toml(&format!(
            "upstream = \"https://desk.example.com{prefix}\"\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("upstream") && err.contains(says),
            "{prefix}: {err}"
        );
    }
    let c = Config::from_toml(&format!(
        "upstream = \"https://desk.example.com/gw/caf%C3%A9/\"\n{MINIMAL}"
    ))
    .unwrap();
    assert_eq!(c.upstream.prefix, "/gw/caf%C3%A9");
}

#[test]
fn a_recorded_body_is_bounded() {
    let c =
        Config::from_toml(&format!("{MINIMAL}\n[record]\nmax_body_bytes = 16777216\n")).unwrap();
    assert_eq!(c.record.max_body_bytes, 16 << 20);
    let err = Config::from_toml(&format!(
        "{MINIMAL}\n[record]\nmax_body_bytes = 2000000000000\n"
    ))
    .unwrap_err();
    assert!(err.to_string().contains("record.max_body_bytes"), "{err}");
}

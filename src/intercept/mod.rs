//! Transparent mode (README "Clients that cannot change their URL"): the listener is also
//! an HTTPS proxy for Zoho's hosts only. A client's `CONNECT` to an intercepted host is
//! answered by the serving layer with a TLS tunnel ended here, with a leaf certificate of
//! the local CA ([`ca`]); the requests inside go through the same request path as any
//! other, Accounts' ones answered locally ([`accounts`]).

pub mod accounts;
pub mod ca;

use std::sync::Arc;

use crate::config::InterceptConfig;
pub use ca::{CaError, LocalCa};

/// What the serving layer needs to end tunnels: the TLS configuration (the local CA's
/// leaves, HTTP/2 and HTTP/1.1 by ALPN) and the intercepted hosts.
#[derive(Debug)]
pub struct Intercept {
    /// rustls' server configuration for the tunnels.
    pub tls: Arc<rustls::ServerConfig>,
    settings: InterceptConfig,
}

/// Which intercepted service a host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Zoho Desk: forwarded as in reverse mode.
    Desk,
    /// Zoho Accounts: answered locally.
    Accounts,
}

impl Intercept {
    /// Loads the local CA of `settings.ca_dir`, to end tunnels for the intercepted hosts.
    pub fn load(settings: &InterceptConfig) -> Result<Self, CaError> {
        crate::client::install_crypto_provider();
        let ca = LocalCa::load(&settings.ca_dir, settings.hosts())?;
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| CaError::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(ca));
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self {
            tls: Arc::new(tls),
            settings: settings.clone(),
        })
    }

    /// The service a host name (no port, no trailing dot: as `target::host_name` gives
    /// it) is, when it is intercepted.
    pub fn service(&self, host: &str) -> Option<Service> {
        if self
            .settings
            .desk_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
        {
            Some(Service::Desk)
        } else if self
            .settings
            .accounts_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
        {
            Some(Service::Accounts)
        } else {
            None
        }
    }

    /// Every intercepted host name, for messages.
    pub fn hosts(&self) -> Vec<String> {
        self.settings.hosts()
    }

    /// The `api_domain` of local Accounts answers.
    pub fn api_domain(&self) -> &str {
        &self.settings.api_domain
    }
}

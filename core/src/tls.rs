//! TLS for outgoing HTTPS (FCM, OAuth token endpoints): rustls with the ring provider, the one
//! async-nats and sqlx already use, installed once as the process default so every client
//! built afterwards finds it.

/// Installs ring as rustls's process-wide crypto provider; harmless to call again.
pub fn install_crypto_provider() {
    // Err means a provider is installed already, which is all this asks for.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

//! The web client at `/`: a small static app (`clients/web/`) on the JavaScript client library
//! (`clients/js/hotpath.js`), compiled into the binary so that every gateway serves the client
//! of its own version, with no files to deploy beside it.
//!
//! `/` is the page and `/app/<file>` its scripts and styles: a fixed table of files, so nothing
//! else (`/v1/…`, `/healthz`, `/metrics`, `/live`) is shadowed and no path is ever looked up on
//! disk. The names carry no content hash, so browsers are told to revalidate every time
//! (`Cache-Control: no-cache`) and each file has a strong `ETag` (a digest of its bytes): an
//! unchanged file costs a 304 without a body, and a gateway upgrade is picked up at the next load.

use std::sync::LazyLock;

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hotpath_core::rejection::Rejection;
use sha2::{Digest, Sha256};

use crate::http::{ApiError, Path};

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $path:literal, $content_type:literal) => {
        Asset {
            name: $name,
            content_type: $content_type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../", $path)),
        }
    };
}

const INDEX: &str = "index.html";

static ASSETS: [Asset; 4] = [
    asset!(
        "index.html",
        "clients/web/index.html",
        "text/html; charset=utf-8"
    ),
    asset!(
        "app.js",
        "clients/web/app.js",
        "text/javascript; charset=utf-8"
    ),
    asset!(
        "style.css",
        "clients/web/style.css",
        "text/css; charset=utf-8"
    ),
    asset!(
        "hotpath.js",
        "clients/js/hotpath.js",
        "text/javascript; charset=utf-8"
    ),
];

/// Each asset's `ETag`, in the order of [`ASSETS`].
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    ASSETS
        .iter()
        .map(|asset| format!("\"{}\"", &hex::encode(Sha256::digest(asset.body))[..32]))
        .collect()
});

/// The page may load only its own files and talk only to its own gateway (HTTP and WebSocket).
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// `GET /`: the web client's page.
pub async fn index(headers: HeaderMap) -> Response {
    serve(INDEX, &headers).unwrap_or_else(|rejection| ApiError(rejection).into_response())
}

/// `GET /app/{file}`: one of the page's files; anything else is the usual JSON 404.
pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    serve(&file, &headers).unwrap_or_else(|rejection| ApiError(rejection).into_response())
}

fn serve(name: &str, request: &HeaderMap) -> Result<Response, Rejection> {
    let index = ASSETS
        .iter()
        .position(|asset| asset.name == name)
        .ok_or(Rejection::RouteNotFound)?;
    let asset = &ASSETS[index];
    let etag: &'static str = ETAGS[index].as_str();
    let mut headers = HeaderMap::new();
    // Every value is a literal or a quoted hex digest: visible ASCII, which `from_static`
    // accepts.
    headers.insert(ETAG, HeaderValue::from_static(etag));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    if asset.name == INDEX {
        headers.insert(
            CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(PAGE_POLICY),
        );
        headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    }
    if matches_etag(request, etag) {
        return Ok((StatusCode::NOT_MODIFIED, headers).into_response());
    }
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    Ok((headers, asset.body).into_response())
}

/// Whether the request's `If-None-Match` names `etag` (or is `*`): the browser's copy is current.
fn matches_etag(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(if_none_match: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(IF_NONE_MATCH, if_none_match.parse().unwrap());
        headers
    }

    #[test]
    fn a_current_copy_is_recognised_by_its_etag_in_any_list_or_weak_form() {
        let etag = "\"abc\"";
        assert!(matches_etag(&request("\"abc\""), etag));
        assert!(matches_etag(&request("\"x\", W/\"abc\""), etag));
        assert!(matches_etag(&request("*"), etag));
        assert!(!matches_etag(&request("\"abd\""), etag));
        assert!(!matches_etag(&HeaderMap::new(), etag));
    }

    #[test]
    fn every_asset_has_a_distinct_quoted_etag() {
        let mut tags = ETAGS.clone();
        assert!(tags.iter().all(|t| t.len() == 34 && t.starts_with('"')));
        tags.sort();
        tags.dedup();
        assert_eq!(tags.len(), ASSETS.len());
    }

    #[test]
    fn unknown_files_are_not_found() {
        let err = serve("../Cargo.toml", &HeaderMap::new()).unwrap_err();
        assert_eq!(err.code(), "NOT_FOUND");
    }
}

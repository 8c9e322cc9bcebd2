//! Which other sites' pages may call the HTTP API from a browser (CORS): `--cors-origin`.

use crate::auth::{AuthConfig, AuthError};
use axum::http::{HeaderValue, Method, header};
use tower_http::cors::{AllowOrigin, Any, CorsLayer};

/// The origins allowed by `--cors-origin`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Origins {
    /// None given.
    Default,
    /// `*`: any origin, asked for explicitly.
    Any,
    List(Vec<HeaderValue>),
}

/// Reads the `--cors-origin` values: `*`, or origins as a browser sends them
/// (`scheme://host[:port]`, no path).
pub(crate) fn origins(values: &[String]) -> Result<Origins, AuthError> {
    let values: Vec<&str> = values
        .iter()
        .map(|value| value.trim())
        .filter(|value| !value.is_empty())
        .collect();
    if values.is_empty() {
        return Ok(Origins::Default);
    }
    if values.contains(&"*") {
        return Ok(Origins::Any);
    }
    values
        .into_iter()
        .map(|value| {
            let origin = value.strip_suffix('/').unwrap_or(value);
            let well_formed = origin.split_once("://").is_some_and(|(scheme, host)| {
                !scheme.is_empty()
                    && scheme
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
                    && !host.is_empty()
                    && !host.contains(['/', '?', '#', ' ', '*'])
            });
            well_formed
                .then(|| HeaderValue::from_str(origin).ok())
                .flatten()
                .ok_or_else(|| AuthError::CorsOrigin(value.chars().take(100).collect()))
        })
        .collect::<Result<_, _>>()
        .map(Origins::List)
}

/// The CORS layer for this configuration. Without `--cors-origin`, any origin may read when
/// auth is off (as before), and none but the server's own pages when it is on: a page of
/// another site must not use a token that a person pasted into it without the operator's say.
pub(crate) fn layer(config: &AuthConfig, auth_on: bool) -> CorsLayer {
    let allow = match origins(&config.cors_origins).unwrap_or(Origins::Default) {
        Origins::Default if !auth_on => {
            return CorsLayer::new().allow_origin(Any).allow_methods(Any);
        }
        Origins::Default => return CorsLayer::new(),
        Origins::Any => AllowOrigin::any(),
        Origins::List(list) => AllowOrigin::list(list),
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::HEAD])
        // A page sends its token, and asks for part of a video.
        .allow_headers([header::AUTHORIZATION, header::RANGE])
        .expose_headers([header::CONTENT_RANGE, header::ETAG])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(values: &[&str]) -> Result<Origins, AuthError> {
        origins(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn origins_are_read_as_a_browser_sends_them() {
        assert_eq!(list(&[]).ok(), Some(Origins::Default));
        assert_eq!(list(&["*"]).ok(), Some(Origins::Any));
        assert_eq!(
            list(&["https://chat.example.com", "http://localhost:3000/"]).ok(),
            Some(Origins::List(vec![
                HeaderValue::from_static("https://chat.example.com"),
                HeaderValue::from_static("http://localhost:3000"),
            ]))
        );
        for bad in [
            "chat.example.com",
            "https://",
            "https://a.example/path",
            "https://*.example",
        ] {
            assert!(list(&[bad]).is_err(), "{bad}");
        }
    }
}

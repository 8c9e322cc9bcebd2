//! Which pages may reach kaiwa from a browser: CORS (`--cors-origin`), and with auth off the
//! check of every request's `Origin` and `Host` (DNS rebinding), since a page that reaches a
//! server with auth off can be any client.

use crate::auth::AuthConfig;
use crate::flags::{Origins, hosts, origins};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kaiwa_protocol::ErrorCode;
use kaiwa_protocol::history::ErrorBody;
use std::net::IpAddr;
use std::sync::Arc;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// The CORS layer for this configuration. Without `--cors-origin`, pages of loopback origins
/// (any port: a development server beside kaiwa) may read when auth is off, and none but the
/// server's own pages when it is on: a page of another site must not use a token that a person
/// pasted into it without the operator's say.
pub(crate) fn layer(config: &AuthConfig, auth_on: bool) -> CorsLayer {
    let allow = match origins(&config.cors_origins).unwrap_or(Origins::Default) {
        Origins::Default if !auth_on => {
            AllowOrigin::predicate(|origin, _| origin.to_str().is_ok_and(is_loopback_origin))
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

/// Who a browser page may be when auth is off. With auth on, a page needs a token and this
/// checks nothing.
#[derive(Debug, Clone)]
pub(crate) struct Browsers {
    /// `None` with auth on.
    rules: Option<Arc<Rules>>,
}

#[derive(Debug)]
struct Rules {
    /// `--allowed-host`, lowercase.
    hosts: Vec<String>,
    /// `--cors-origin`.
    origins: Origins,
}

impl Browsers {
    pub(crate) fn new(config: &AuthConfig, auth_on: bool) -> Self {
        let rules = (!auth_on).then(|| {
            Arc::new(Rules {
                hosts: hosts(&config.allowed_hosts).unwrap_or_default(),
                origins: origins(&config.cors_origins).unwrap_or(Origins::Default),
            })
        });
        Self { rules }
    }

    /// Refuses a request that a page of another site could have made: a `Host` that is no
    /// loopback name, IP address or allowed host (421), or an `Origin` that is neither
    /// loopback, nor this server, nor a configured one (403). A request without `Origin` comes
    /// from a program, not a page, and goes through.
    fn check(&self, headers: &HeaderMap) -> Result<(), Refused> {
        let Some(rules) = &self.rules else {
            return Ok(());
        };
        let host = headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok());
        if let Some(host) = host
            && !rules.allows_host(host)
        {
            return Err(Refused::Host);
        }
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or_default();
        let same_site = host.is_some_and(|host| {
            origin
                .split_once("://")
                .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host))
        });
        if same_site || is_loopback_origin(origin) || rules.origins.allows(origin) {
            return Ok(());
        }
        Err(Refused::Origin)
    }
}

/// Why a browser's request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Host,
    Origin,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            Self::Host => (
                StatusCode::MISDIRECTED_REQUEST,
                ErrorCode::ForbiddenHost,
                "this server runs without auth and answers only by a loopback name, an IP address or --allowed-host",
            ),
            Self::Origin => (
                StatusCode::FORBIDDEN,
                ErrorCode::ForbiddenOrigin,
                "this server runs without auth and answers pages of loopback origins, its own, and --cors-origin only",
            ),
        };
        metrics::counter!("kaiwa_http_refused_total", "reason" => code.as_str()).increment(1);
        (status, axum::Json(ErrorBody::new(code, message))).into_response()
    }
}

impl Rules {
    fn allows_host(&self, host: &str) -> bool {
        let name = host_name(host);
        is_loopback_name(name)
            || name.trim_matches(['[', ']']).parse::<IpAddr>().is_ok()
            || self
                .hosts
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(name))
    }
}

/// The middleware of [`Browsers`].
pub(crate) async fn guard(
    State(browsers): State<Browsers>,
    request: Request,
    next: Next,
) -> Response {
    match browsers.check(request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => refused.into_response(),
    }
}

/// A `Host` header's name, without its port: `[::1]:8082` → `[::1]`.
fn host_name(host: &str) -> &str {
    match host.rsplit_once(':') {
        // A bare IPv6 literal has colons of its own but no brackets.
        Some((name, port))
            if port.chars().all(|c| c.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    }
}

/// `localhost`, a name under `.localhost`, or a loopback address.
fn is_loopback_name(name: &str) -> bool {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name
            .trim_matches(['[', ']'])
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether `origin` (`scheme://host[:port]`) is a page served from this machine.
fn is_loopback_origin(origin: &str) -> bool {
    origin.split_once("://").is_some_and(|(scheme, authority)| {
        matches!(scheme, "http" | "https") && is_loopback_name(host_name(authority))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(host: &str, origin: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_str(host).expect("a value"));
        if let Some(origin) = origin {
            headers.insert(
                header::ORIGIN,
                HeaderValue::from_str(origin).expect("a value"),
            );
        }
        headers
    }

    fn browsers(cors: &[&str], allowed: &[&str]) -> Browsers {
        let rules = Rules {
            hosts: hosts(&allowed.iter().map(|v| v.to_string()).collect::<Vec<_>>())
                .expect("valid hosts"),
            origins: origins(&cors.iter().map(|v| v.to_string()).collect::<Vec<_>>())
                .expect("valid origins"),
        };
        Browsers {
            rules: Some(Arc::new(rules)),
        }
    }

    fn status(result: Result<(), Refused>) -> u16 {
        result
            .err()
            .map_or(200, |refused| refused.into_response().status().as_u16())
    }

    #[test]
    fn without_auth_only_loopback_and_configured_pages_get_in() {
        let open = browsers(&[], &[]);
        for (host, origin) in [
            ("127.0.0.1:8082", None),
            ("localhost:8082", Some("http://localhost:3000")),
            ("127.0.0.1:8082", Some("http://127.0.0.1:5173")),
            ("[::1]:8082", Some("http://[::1]:8082")),
            ("app.localhost", Some("https://app.localhost")),
            // A server on a LAN address, its own page.
            ("192.168.1.5:8082", Some("http://192.168.1.5:8082")),
        ] {
            assert_eq!(
                status(open.check(&headers(host, origin))),
                200,
                "{host} {origin:?}"
            );
        }
        // Another site's page, by origin.
        assert_eq!(
            status(open.check(&headers("127.0.0.1:8082", Some("https://evil.example")))),
            403
        );
        assert_eq!(
            status(open.check(&headers("127.0.0.1:8082", Some("null")))),
            403
        );
        // DNS rebinding: the page's own origin, but a name that resolves to us.
        assert_eq!(
            status(open.check(&headers(
                "rebind.evil.example:8082",
                Some("http://rebind.evil.example:8082")
            ))),
            421
        );
        assert_eq!(
            status(open.check(&headers("rebind.evil.example", None))),
            421
        );
    }

    #[test]
    fn configured_origins_and_hosts_are_let_in() {
        let configured = browsers(&["https://chat.example.com"], &["chat.example.com"]);
        assert_eq!(
            status(configured.check(&headers(
                "chat.example.com",
                Some("https://chat.example.com")
            ))),
            200
        );
        assert_eq!(
            status(configured.check(&headers("127.0.0.1:8082", Some("https://chat.example.com")))),
            200
        );
        assert_eq!(
            status(configured.check(&headers("other.example.com", None))),
            421
        );
        let auth_on = Browsers { rules: None };
        assert_eq!(
            status(auth_on.check(&headers("anything.example", Some("https://evil.example")))),
            200
        );
    }

    #[test]
    fn host_names_lose_their_port_only() {
        assert_eq!(host_name("localhost:8082"), "localhost");
        assert_eq!(host_name("[::1]:8082"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
        assert_eq!(host_name("::1"), "::1");
        assert_eq!(host_name("example.com"), "example.com");
    }
}

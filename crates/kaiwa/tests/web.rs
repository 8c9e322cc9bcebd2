//! The browser client is served by kaiwa itself: the page at `/` and its assets, with the right
//! content types and cache headers.

mod support;

use support::TestApp;

async fn get(app: &TestApp, path: &str) -> reqwest::Response {
    app.http
        .get(app.url(path))
        .send()
        .await
        .expect("HTTP works")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test]
async fn the_page_is_served_at_the_root_as_html() {
    let app = TestApp::spawn(&[]).await;
    let response = get(&app, "/").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        header(&response, "content-type"),
        "text/html; charset=utf-8"
    );
    assert_eq!(header(&response, "cache-control"), "no-cache");
    assert!(header(&response, "etag").starts_with('"'));
    assert!(header(&response, "content-security-policy").contains("script-src 'self'"));
    let body = response.text().await.expect("a body");
    assert!(body.contains(r#"<script type="module" src="/assets/app.js">"#));
}

#[tokio::test]
async fn every_asset_is_served_with_its_content_type() {
    let app = TestApp::spawn(&[]).await;
    for (path, content_type) in [
        ("/assets/app.js", "text/javascript; charset=utf-8"),
        ("/assets/protocol.js", "text/javascript; charset=utf-8"),
        ("/assets/conversation.js", "text/javascript; charset=utf-8"),
        ("/assets/ui.js", "text/javascript; charset=utf-8"),
        ("/assets/media.js", "text/javascript; charset=utf-8"),
        ("/assets/words.js", "text/javascript; charset=utf-8"),
        ("/assets/style.css", "text/css; charset=utf-8"),
        ("/assets/favicon.svg", "image/svg+xml"),
    ] {
        let response = get(&app, path).await;
        assert_eq!(response.status(), 200, "{path}");
        assert_eq!(header(&response, "content-type"), content_type, "{path}");
        assert_eq!(
            header(&response, "x-content-type-options"),
            "nosniff",
            "{path}"
        );
        assert!(
            !response.bytes().await.expect("a body").is_empty(),
            "{path}"
        );
    }
}

#[tokio::test]
async fn an_unchanged_asset_is_answered_with_not_modified() {
    let app = TestApp::spawn(&[]).await;
    let first = get(&app, "/assets/app.js").await;
    let etag = header(&first, "etag").to_owned();
    let again = app
        .http
        .get(app.url("/assets/app.js"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("HTTP works");
    assert_eq!(again.status(), 304);
    assert_eq!(header(&again, "etag"), etag);
    assert!(again.bytes().await.expect("a body").is_empty());
}

#[tokio::test]
async fn an_unknown_asset_is_not_found() {
    let app = TestApp::spawn(&[]).await;
    for path in ["/assets/nope.js", "/assets/..%2Fapp.js", "/assets/"] {
        assert_eq!(get(&app, path).await.status(), 404, "{path}");
    }
}

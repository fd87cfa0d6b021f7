//! The HTTP publish API: same broker, same delivery, guarded, with clear errors.

use uuid::Uuid;

use crate::common::nginx::Nginx;
use crate::common::{RedisServer, Subscriber, TestApp, chat, sse_path};

async fn round_trip(app: &TestApp) {
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    let messages = [chat("p1", 0), chat("p2", 1)];
    for m in &messages {
        let response = app.post(&format!("/api/v1/chats/{room}/messages"), m).await;
        assert_eq!(response.status(), 202);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["sessionId"], room.to_string());
    }
    assert_eq!(viewer.messages(2).await, messages);
    let response = app.post(&format!("/api/v1/chats/{room}/end"), "").await;
    assert_eq!(response.status(), 202);
    let end = viewer.next_event().await.expect("end event");
    assert_eq!(end.event, "end");
    let payload: serde_json::Value = serde_json::from_str(&end.data).unwrap();
    assert_eq!(payload["id"], room.to_string());
    assert!(viewer.next_event().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_round_trips_in_embedded_mode() {
    let app = TestApp::spawn(None, &[]).await;
    assert_eq!(app.get("/readyz").await.status(), 200);
    round_trip(&app).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_round_trips_through_redis() {
    let redis = RedisServer::start().await;
    let app = TestApp::spawn(Some(&redis), &[]).await;
    round_trip(&app).await;
}

async fn error(response: reqwest::Response, status: u16, code: &str) {
    assert_eq!(response.status(), status);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_requires_the_token_when_one_is_set() {
    let app = TestApp::spawn(None, &[("PUBLISH_TOKEN", "t0ken")]).await;
    let room = Uuid::new_v4();
    let path = app.url(&format!("/api/v1/chats/{room}/messages"));
    let send = |auth: Option<&'static str>| {
        let mut request = app
            .http
            .post(&path)
            .header("content-type", "application/json")
            .body(chat("p1", 0));
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    error(send(None).await.unwrap(), 401, "UNAUTHORIZED").await;
    error(
        send(Some("Bearer wrong")).await.unwrap(),
        401,
        "UNAUTHORIZED",
    )
    .await;
    error(send(Some("t0ken")).await.unwrap(), 401, "UNAUTHORIZED").await;
    assert_eq!(send(Some("Bearer t0ken")).await.unwrap().status(), 202);
    assert_eq!(
        send(Some("bearer t0ken")).await.unwrap().status(),
        202,
        "the scheme is case-insensitive (RFC 9110)"
    );
}

/// The defaults a fresh install relies on: without PUBLISH_TOKEN, the publish API
/// answers a process on the host that speaks to it directly, and nobody else, not
/// a client of a proxy on the same host, not a web page in a browser on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_no_proxy_client_and_no_web_page_can_publish() {
    let app = TestApp::spawn(None, &[]).await;
    let room = Uuid::new_v4();
    let mut viewer = app.connect(room).await;
    let messages = app.url(&format!("/api/v1/chats/{room}/messages"));
    let end = app.url(&format!("/api/v1/chats/{room}/end"));
    let post = |url: &str, headers: &[(&'static str, &str)]| {
        let mut request = app
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(chat("x", 0));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        request.send()
    };
    for url in [&messages, &end] {
        for forwarded in [
            ("x-forwarded-for", "198.51.100.7"),
            ("forwarded", "for=198.51.100.7"),
            ("x-real-ip", "198.51.100.7"),
        ] {
            error(post(url, &[forwarded]).await.unwrap(), 403, "FORBIDDEN").await;
        }
        let page = [("origin", "https://evil.example")];
        error(post(url, &page).await.unwrap(), 403, "FORBIDDEN").await;
        let rebound = [("host", "evil.example"), ("origin", "http://evil.example")];
        error(post(url, &rebound).await.unwrap(), 403, "FORBIDDEN").await;
    }
    // No preflight is needed for text/plain, so it is refused as a type.
    let plain = app
        .http
        .post(&messages)
        .header("content-type", "text/plain")
        .body(chat("x", 0))
        .send()
        .await
        .unwrap();
    error(plain, 415, "UNSUPPORTED_MEDIA_TYPE").await;
    // And no CORS is offered to the publish API, while the streams keep theirs.
    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, &messages)
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(
        !preflight
            .headers()
            .contains_key("access-control-allow-origin")
    );
    let stream = app
        .http
        .get(app.url(&sse_path(Uuid::new_v4())))
        .header("origin", "https://ok.example")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.headers()["access-control-allow-origin"], "*");

    // The demo page (same origin, on the host) and a local process still publish.
    let same = [("origin", app.base.as_str())];
    assert_eq!(post(&messages, &same).await.unwrap().status(), 202);
    assert_eq!(post(&messages, &[]).await.unwrap().status(), 202);
    assert_eq!(viewer.messages(2).await, vec![chat("x", 0), chat("x", 0)]);
}

/// The attack as reported: nginx on the same host in front of chat-sync with no token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_deploy_nginx_publishing_needs_the_token() {
    let app = TestApp::spawn(None, &[]).await;
    let upstream = app.base.trim_start_matches("http://").to_string();
    let nginx = Nginx::start(&[upstream.clone(), upstream.clone(), upstream]);
    let room = Uuid::new_v4();
    let mut viewer = Subscriber::connect(&nginx.url(&sse_path(room)), None).await;
    for path in ["messages", "end"] {
        let response = app
            .http
            .post(nginx.url(&format!("/api/v1/chats/{room}/{path}")))
            .header("content-type", "application/json")
            .header("x-forwarded-for", "198.51.100.7")
            .body("{}")
            .send()
            .await
            .unwrap();
        error(response, 403, "FORBIDDEN").await;
    }
    assert_eq!(
        app.http
            .get(nginx.url("/metrics"))
            .send()
            .await
            .unwrap()
            .status(),
        404,
        "metrics are not on the public side"
    );
    // The viewer was not ended: a direct local publish still reaches it.
    let direct = app
        .post(&format!("/api/v1/chats/{room}/messages"), &chat("p", 1))
        .await;
    assert_eq!(direct.status(), 202);
    assert_eq!(viewer.messages(1).await, vec![chat("p", 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_json_errors() {
    let app = TestApp::spawn(None, &[("MAX_MESSAGE_BYTES", "1024")]).await;
    let room = Uuid::new_v4();
    let messages = format!("/api/v1/chats/{room}/messages");
    error(app.post(&messages, "not json").await, 400, "BAD_REQUEST").await;
    error(
        app.post(&messages, r#"{"unterminated": "#).await,
        400,
        "BAD_REQUEST",
    )
    .await;
    error(
        app.post(&messages, r#"["an","array"]"#).await,
        400,
        "BAD_REQUEST",
    )
    .await;
    error(app.post(&messages, "").await, 400, "BAD_REQUEST").await;
    // Invalid UTF-8 inside a string, and a lone surrogate escape: not text.
    let bad_utf8 = app
        .http
        .post(app.url(&messages))
        .header("content-type", "application/json")
        .body(b"{\"message\":\"\xff\xfe\"}".to_vec())
        .send()
        .await
        .unwrap();
    error(bad_utf8, 400, "BAD_REQUEST").await;
    error(
        app.post(&messages, r#"{"message":"\ud800"}"#).await,
        400,
        "BAD_REQUEST",
    )
    .await;
    let big = format!(r#"{{"message":"{}"}}"#, "x".repeat(2000));
    error(app.post(&messages, &big).await, 413, "PAYLOAD_TOO_LARGE").await;
    error(
        app.post("/api/v1/chats/not-a-uuid/messages", &chat("p", 0))
            .await,
        400,
        "BAD_REQUEST",
    )
    .await;
    error(
        app.post(&format!("/api/v1/chats/{room}/end"), "[1]").await,
        400,
        "BAD_REQUEST",
    )
    .await;
    error(
        app.get("/api/v1/chats/sse-connect/not-a-uuid").await,
        400,
        "BAD_REQUEST",
    )
    .await;
    error(
        app.get("/api/v1/chats/sse-connect/1234").await,
        400,
        "BAD_REQUEST",
    )
    .await;
    // The server is unharmed: a good message still goes through.
    let mut viewer = app.connect(room).await;
    assert_eq!(app.post(&messages, &chat("p1", 0)).await.status(), 202);
    assert_eq!(viewer.messages(1).await, vec![chat("p1", 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_each_route_and_each_documented_route_is_served() {
    let app = TestApp::spawn(None, &[]).await;
    let doc: serde_json::Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let room = Uuid::new_v4();
    for (path, method, concrete) in [
        (
            "/api/v1/chats/sse-connect/{sessionId}",
            "get",
            format!("/api/v1/chats/sse-connect/{room}"),
        ),
        (
            "/api/v1/chats/{sessionId}/messages",
            "post",
            format!("/api/v1/chats/{room}/messages"),
        ),
        (
            "/api/v1/chats/{sessionId}/end",
            "post",
            format!("/api/v1/chats/{room}/end"),
        ),
        ("/healthz", "get", "/healthz".into()),
        ("/readyz", "get", "/readyz".into()),
        ("/metrics", "get", "/metrics".into()),
        ("/openapi.json", "get", "/openapi.json".into()),
        ("/", "get", "/".into()),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is documented"
        );
        let request = match method {
            "get" => app.http.get(app.url(&concrete)),
            _ => app.http.post(app.url(&concrete)).body(chat("p", 0)),
        };
        // For the stream, only the head is read: the body does not end.
        let status = request.send().await.unwrap().status();
        assert_ne!(status, 404, "{method} {concrete} is served");
        assert_ne!(status, 405, "{method} {concrete} is served");
    }
    assert_eq!(
        app.get("/no/such/route").await.status(),
        404,
        "the check can fail"
    );
}

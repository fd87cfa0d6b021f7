//! The HTTP publish API: same broker, same delivery, guarded, with clear errors.

use uuid::Uuid;

use crate::common::{RedisServer, TestApp, chat};

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
        let mut request = app.http.post(&path).body(chat("p1", 0));
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

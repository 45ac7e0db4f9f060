//! The admin listener (`[admin] listen`, loopback by default): `/healthz`, `/readyz`,
//! `/metrics`, `GET /connections` and `DELETE /connections/{id}`. With `token_file` set, every
//! endpoint but the two probes wants `Authorization: Bearer <token>`.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::request::readyz;
use crate::respond::{self, response as respond, text, Resp};

/// Serves the admin endpoints until `stop` fires.
pub async fn serve(listener: TcpListener, app: Arc<App>, token: Option<String>, stop: CancellationToken) {
    let token: Option<Arc<str>> = token.map(Arc::from);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let (app, token) = (app.clone(), token.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, app.clone(), token.clone()));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
        });
    }
}

async fn handle(req: Request<Incoming>, app: Arc<App>, token: Option<Arc<str>>) -> Result<Resp, Infallible> {
    let path = req.uri().path();
    let method = req.method();
    if method == Method::GET && path == "/healthz" {
        return Ok(text(StatusCode::OK, "ok\n"));
    }
    if method == Method::GET && path == "/readyz" {
        return Ok(readyz(&app));
    }
    if let Some(token) = &token {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        let ok = given.and_then(|v| v.strip_prefix("Bearer ")).is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()));
        if !ok {
            let mut resp = text(StatusCode::UNAUTHORIZED, "a bearer token is required\n");
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
            return Ok(resp);
        }
    }
    Ok(match (method, path) {
        (&Method::GET, "/metrics") => {
            respond(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", app.metrics.encode())
        }
        (&Method::GET, "/connections") => {
            let body = serde_json::to_vec(&app.registry.list()).expect("JSON values serialize");
            respond(StatusCode::OK, "application/json", body)
        }
        (&Method::DELETE, p) if p.starts_with("/connections/") => {
            let id = &p["/connections/".len()..];
            if app.registry.close(id) {
                respond::empty(StatusCode::NO_CONTENT)
            } else {
                text(StatusCode::NOT_FOUND, "no live connection with that id\n")
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

//! A forwarder in front of moto that counts STS calls by `Action` and injects faults
//! (delay, 503, throttling, AccessDenied, short-lived credentials) switchable at run time.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Every call answers 503 (STS down).
    Unavailable,
    /// Every call answers STS's Throttling error.
    Throttle,
    /// AssumeRole answers AccessDenied.
    Deny,
    /// AssumeRole answers AccessDenied with this message (e.g. a missing sts:TagSession).
    DenyWith(String),
    /// The next `n` calls answer STS's Throttling error, later ones pass (recovery).
    ThrottleNext(u32),
}

#[derive(Default)]
struct State {
    counts: HashMap<String, u64>,
    /// `RoleArn` of every AssumeRole call, in order.
    assumed: Vec<String>,
    /// Every AssumeRole call, in order of arrival.
    assume_calls: Vec<AssumeCall>,
    /// When each AssumeRole call arrived.
    assume_times: Vec<Instant>,
    fault: Option<Fault>,
    delay: Duration,
    /// AssumeRole answers carry credentials expiring this long after the answer.
    expires_in: Option<Duration>,
}

/// One AssumeRole call as it reached STS.
#[derive(Debug, Clone, Default)]
pub struct AssumeCall {
    /// Its form parameters (`RoleArn`, `RoleSessionName`, `Tags.member.1.Key`,
    /// `SourceIdentity`...).
    pub params: Vec<(String, String)>,
    /// The access key id that signed it (from its SigV4 `Authorization` header): whose
    /// credentials made the call.
    pub signer: Option<String>,
    /// The access key id of the credentials STS answered with, when it answered them:
    /// a later call signed with it was made with this call's session (role chaining).
    pub issued: Option<String>,
}

#[derive(Clone)]
pub struct StsProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

fn sts_error(status: u16, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
         <Error><Type>Sender</Type><Code>{code}</Code><Message>{message}</Message></Error>\
         <RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
    );
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
    response
        .headers_mut()
        .insert("content-type", "text/xml".parse().unwrap());
    response
}

impl StsProxy {
    /// Listens on loopback and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Self {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
        };
        let state = proxy.state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request| forward(request, upstream, state.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        proxy
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Calls seen for `action` (e.g. `AssumeRole`), faulted ones included.
    pub fn count(&self, action: &str) -> u64 {
        self.state
            .lock()
            .unwrap()
            .counts
            .get(action)
            .copied()
            .unwrap_or(0)
    }

    /// The `RoleArn` of every AssumeRole call so far, in order.
    pub fn assumed_roles(&self) -> Vec<String> {
        self.state.lock().unwrap().assumed.clone()
    }

    /// The form parameters (`RoleSessionName`, `Tags.member.1.Key`, `SourceIdentity`...)
    /// of every AssumeRole call so far, in order.
    pub fn assume_params(&self) -> Vec<Vec<(String, String)>> {
        let state = self.state.lock().unwrap();
        state
            .assume_calls
            .iter()
            .map(|call| call.params.clone())
            .collect()
    }

    /// Every AssumeRole call so far, in order of arrival, with who signed it and the key
    /// it was answered with.
    pub fn assume_calls(&self) -> Vec<AssumeCall> {
        self.state.lock().unwrap().assume_calls.clone()
    }

    /// When each AssumeRole call arrived, in order (to see backoff).
    pub fn assume_times(&self) -> Vec<Instant> {
        self.state.lock().unwrap().assume_times.clone()
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state.lock().unwrap().fault = Some(fault);
    }

    pub fn set_delay(&self, delay: Duration) {
        self.state.lock().unwrap().delay = delay;
    }

    /// From now on AssumeRole's credentials expire `expires_in` after STS answered
    /// (moto's are valid for the whole session asked for): what a test needs to reach an
    /// expiry within seconds. `None` passes moto's expiry through.
    pub fn set_expires_in(&self, expires_in: Option<Duration>) {
        self.state.lock().unwrap().expires_in = expires_in;
    }
}

async fn forward(
    request: Request<Incoming>,
    upstream: SocketAddr,
    state: Arc<Mutex<State>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = request.into_parts();
    let body = body.collect().await?.to_bytes();
    let action = form_urlencoded::parse(&body)
        .find(|(key, _)| key == "Action")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    let role_arn = form_urlencoded::parse(&body)
        .find(|(key, _)| key == "RoleArn")
        .map(|(_, value)| value.into_owned());
    let signer = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(signing_key);
    let (fault, delay, expires_in, call) = {
        let mut state = state.lock().unwrap();
        *state.counts.entry(action.clone()).or_default() += 1;
        let call = (action == "AssumeRole").then(|| {
            state.assume_times.push(Instant::now());
            state.assume_calls.push(AssumeCall {
                params: form_urlencoded::parse(&body)
                    .map(|(key, value)| (key.into_owned(), value.into_owned()))
                    .collect(),
                signer,
                issued: None,
            });
            state.assume_calls.len() - 1
        });
        state.assumed.extend(role_arn);
        let fault = match state.fault.clone().unwrap_or(Fault::None) {
            Fault::ThrottleNext(0) => Fault::None,
            Fault::ThrottleNext(n) => {
                state.fault = Some(Fault::ThrottleNext(n - 1));
                Fault::Throttle
            }
            fault => fault,
        };
        (fault, state.delay, state.expires_in, call)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match fault {
        Fault::Unavailable => return Ok(sts_error(503, "ServiceUnavailable", "injected outage")),
        Fault::Throttle => return Ok(sts_error(400, "Throttling", "Rate exceeded")),
        Fault::Deny if action == "AssumeRole" => {
            return Ok(sts_error(
                403,
                "AccessDenied",
                "User: arn:aws:iam::123456789012:user/node is not authorized to perform: sts:AssumeRole",
            ));
        }
        Fault::DenyWith(message) if action == "AssumeRole" => {
            return Ok(sts_error(403, "AccessDenied", &message));
        }
        _ => {}
    }
    let stream = TcpStream::connect(upstream).await.expect("moto reachable");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let upstream_request = Request::from_parts(parts, Full::new(body));
    let response = sender.send_request(upstream_request).await?;
    let (mut parts, body) = response.into_parts();
    let mut body = body.collect().await?.to_bytes();
    if let Some(index) = call {
        let issued = element_text(&body, "AccessKeyId");
        state.lock().unwrap().assume_calls[index].issued = issued;
    }
    if let Some(expires_in) = expires_in.filter(|_| action == "AssumeRole") {
        let expiration =
            interceptor::imds::ec2::timestamp(std::time::SystemTime::now() + expires_in);
        body = Bytes::from(replace_element(&body, "Expiration", &expiration));
        // hyper sets the new length.
        parts.headers.remove(hyper::header::CONTENT_LENGTH);
    }
    Ok(Response::from_parts(parts, Full::new(body)))
}

/// The access key id in a SigV4 `Authorization` header
/// (`AWS4-HMAC-SHA256 Credential=AKID/date/region/service/aws4_request, ...`).
fn signing_key(authorization: &str) -> Option<String> {
    let credential = authorization.split_once("Credential=")?.1;
    let key = credential.split('/').next()?;
    Some(key.to_owned()).filter(|key| !key.is_empty())
}

/// The text of the first `<name>` element of `xml`, if there is one.
fn element_text(xml: &[u8], name: &str) -> Option<String> {
    let xml = String::from_utf8_lossy(xml);
    let (start, end) = element_span(&xml, name)?;
    Some(xml[start..end].trim().to_owned())
}

/// `xml` with the text of its first `<name>` element replaced by `text`.
fn replace_element(xml: &[u8], name: &str, text: &str) -> String {
    let xml = String::from_utf8_lossy(xml);
    let (start, end) = element_span(&xml, name).expect("the element in STS's answer");
    format!("{}{text}{}", &xml[..start], &xml[end..])
}

/// Where the text of the first `<name>` element of `xml` starts and ends.
fn element_span(xml: &str, name: &str) -> Option<(usize, usize)> {
    let (open, close) = (format!("<{name}>"), format!("</{name}>"));
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some((start, end))
}

//! Asking the metadata API from a pod as the end-to-end tests do: one GET that fails the
//! test if the node's identity is in the answer, the AccessKeyId of an answer, and asking
//! again until the answer is the expected one.

use std::time::{Duration, Instant};

use crate::{
    Pod,
    clients::raw,
    fake_imds::{FakeImds, NODE_ACCESS_KEY, NODE_ROLE},
    pod_client::{PodClient, Request},
};

/// The credentials path of the metadata API.
pub const CREDS: &str = "/latest/meta-data/iam/security-credentials/";

/// One GET from `pod` (a blocking client; the test's runtime keeps serving): the status
/// and the trimmed body. Panics if the answer carries the node's credentials or role.
pub fn get(pod: &Pod, path: &str) -> (u16, String) {
    without_node_identity(tokio::task::block_in_place(|| raw(pod, "GET", path, &[])))
}

/// The answer, trimmed; panics if it carries the node's credentials or role.
fn without_node_identity((status, body): (u16, String)) -> (u16, String) {
    assert!(
        !body.contains(NODE_ACCESS_KEY) && !body.contains(NODE_ROLE),
        "the node's identity reached a pod: {body}"
    );
    (status, body.trim().to_owned())
}

/// The AccessKeyId of a credentials document.
pub fn access_key(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).expect("credentials JSON");
    value["AccessKeyId"]
        .as_str()
        .expect("AccessKeyId")
        .to_owned()
}

/// [`get`]s `path` from `pod` until `check` holds, for at most `within`: the answer that
/// passed, or the last one (the caller's assertion then says what was wrong). One client
/// in the pod asks every time, each time on a new connection.
pub async fn ask_until(
    pod: &Pod,
    path: &str,
    within: Duration,
    check: impl Fn(&(u16, String)) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + within;
    let mut client = PodClient::start(pod);
    let request = Request::get(path);
    loop {
        let answer = without_node_identity(tokio::task::block_in_place(|| {
            client.ask(&request).status_body()
        }));
        if check(&answer) || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The node's metadata service (the agent's upstream) was never asked for credentials.
pub fn assert_upstream_untouched(upstream: &FakeImds) {
    assert!(
        upstream
            .requests()
            .iter()
            .all(|request| !request.contains("security-credentials")),
        "the node's metadata service was asked for credentials: {:?}",
        upstream.requests()
    );
}

//! Responses in the exact shape EC2's metadata service gives them, so every SDK's parser
//! behaves as on EC2: `text/plain` content type, `Server: EC2ws`, JSON documents laid out
//! as EC2 lays them out, and EC2's HTML error pages.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

pub type Body = Full<Bytes>;

pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

fn with_headers(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(header::SERVER, HeaderValue::from_static("EC2ws"));
    response
}

/// 200 with a plain text body.
pub fn text(body: impl Into<Bytes>) -> Response<Body> {
    with_headers(StatusCode::OK, body)
}

/// The token response, echoing the TTL header (the Go and Rust SDKs require it).
pub fn token(token: String, ttl_seconds: u64) -> Response<Body> {
    let mut response = text(token);
    response
        .headers_mut()
        .insert(TTL_HEADER, HeaderValue::from(ttl_seconds));
    response
}

/// EC2's HTML error page for `status`.
pub fn error(status: StatusCode) -> Response<Body> {
    let title = format!(
        "{} - {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n\
         <!DOCTYPE html PUBLIC \"-//W3C//DTD XHTML 1.0 Transitional//EN\"\n\
         \t\t \"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd\">\n\
         <html xmlns=\"http://www.w3.org/1999/xhtml\" xml:lang=\"en\" lang=\"en\">\n \
         <head>\n  <title>{title}</title>\n </head>\n <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    );
    let mut response = with_headers(status, body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    response
}

/// What goes into the credentials document.
pub struct CredentialsDocument<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub token: &'a str,
    pub expiration: SystemTime,
    pub last_updated: SystemTime,
}

/// The body of `GET .../security-credentials/<role>`, served with [`text`] (the caller
/// keeps it: [`crate::credentials::Credentials::rendered`]).
pub fn credentials(document: &CredentialsDocument<'_>) -> Bytes {
    let mut body = Document::new(
        document.access_key_id.len() + document.secret_access_key.len() + document.token.len(),
    );
    body.text("Code", "Success");
    body.time("LastUpdated", document.last_updated);
    body.text("Type", "AWS-HMAC");
    body.text("AccessKeyId", document.access_key_id);
    body.text("SecretAccessKey", document.secret_access_key);
    body.text("Token", document.token);
    body.time("Expiration", document.expiration);
    body.finish()
}

/// What EC2 answers for an instance profile whose role cannot be assumed: a 200 whose
/// `Code` is not `Success`, which every SDK reports as a credentials error.
pub fn credentials_failure(code: &str, message: &str, last_updated: SystemTime) -> Response<Body> {
    let mut body = Document::new(code.len() + message.len());
    body.text("Code", code);
    body.text("Message", message);
    body.time("LastUpdated", last_updated);
    text(body.finish())
}

/// `GET .../iam/info`.
pub fn info(
    instance_profile_arn: &str,
    instance_profile_id: &str,
    last_updated: SystemTime,
) -> Response<Body> {
    let mut body = Document::new(instance_profile_arn.len() + instance_profile_id.len());
    body.text("Code", "Success");
    body.time("LastUpdated", last_updated);
    body.text("InstanceProfileArn", instance_profile_arn);
    body.text("InstanceProfileId", instance_profile_id);
    text(body.finish())
}

/// A JSON object laid out as EC2 lays it out (`{`, one `  "Key" : value` per line, `}`),
/// written into one buffer: a document costs one allocation, however many fields.
struct Document(Vec<u8>);

impl Document {
    /// `values`: the summed length of the string values, so the buffer never grows
    /// (the rest is keys, quotes, times and escapes: 256 bytes are plenty).
    fn new(values: usize) -> Self {
        let mut buffer = Vec::with_capacity(values + 256);
        buffer.push(b'{');
        Self(buffer)
    }

    fn key(&mut self, key: &str) {
        if self.0.len() > 1 {
            self.0.push(b',');
        }
        self.0.extend_from_slice(b"\n  \"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\" : ");
    }

    /// A JSON string, escaped as serde_json escapes.
    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        serde_json::to_writer(&mut self.0, value).expect("writing JSON to memory");
    }

    fn time(&mut self, key: &str, at: SystemTime) {
        self.key(key);
        self.0.push(b'"');
        write_timestamp(&mut self.0, at);
        self.0.push(b'"');
    }

    fn finish(mut self) -> Bytes {
        self.0.extend_from_slice(b"\n}");
        Bytes::from(self.0)
    }
}

/// `2024-05-17T15:09:54Z`, as EC2 writes times.
pub fn timestamp(at: SystemTime) -> String {
    let mut out = Vec::with_capacity(22);
    write_timestamp(&mut out, at);
    String::from_utf8(out).expect("timestamps are ASCII")
}

/// [`timestamp`], appended to `out`.
fn write_timestamp(out: &mut Vec<u8>, at: SystemTime) {
    use std::io::Write as _;
    let seconds = at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let (days, rest) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
    .expect("writing to memory");
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn timestamps_as_ec2_writes_them() {
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(1_495_033_794)),
            "2017-05-17T15:09:54Z"
        );
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn credentials_document_parses_as_json_with_ec2_fields() {
        let at = UNIX_EPOCH + Duration::from_secs(1_495_033_794);
        let response = text(credentials(&CredentialsDocument {
            access_key_id: "ASIAEXAMPLE",
            secret_access_key: "s\"ecret",
            token: "tok",
            expiration: at,
            last_updated: at,
        }));
        assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain");
        assert_eq!(response.headers()[header::SERVER], "EC2ws");
        let body =
            futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["Code"], "Success");
        assert_eq!(json["Type"], "AWS-HMAC");
        assert_eq!(json["SecretAccessKey"], "s\"ecret");
        assert_eq!(json["Expiration"], "2017-05-17T15:09:54Z");
        let keys: Vec<&str> = std::str::from_utf8(&body)
            .unwrap()
            .lines()
            .filter_map(|line| line.trim().strip_prefix('"')?.split('"').next())
            .collect();
        assert_eq!(
            keys,
            [
                "Code",
                "LastUpdated",
                "Type",
                "AccessKeyId",
                "SecretAccessKey",
                "Token",
                "Expiration"
            ]
        );
    }

    fn body(response: Response<Body>) -> String {
        let bytes =
            futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// Byte for byte in EC2's layout: key order, spacing, escapes, no final newline.
    #[test]
    fn documents_are_laid_out_as_ec2_lays_them_out() {
        let at = UNIX_EPOCH + Duration::from_secs(1_495_033_794);
        let document = body(text(credentials(&CredentialsDocument {
            access_key_id: "ASIAEXAMPLE",
            secret_access_key: "se\"cret\\",
            token: "to\nken",
            expiration: at + Duration::from_secs(3600),
            last_updated: at,
        })));
        assert_eq!(
            document,
            "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2017-05-17T15:09:54Z\",\n  \
             \"Type\" : \"AWS-HMAC\",\n  \"AccessKeyId\" : \"ASIAEXAMPLE\",\n  \
             \"SecretAccessKey\" : \"se\\\"cret\\\\\",\n  \"Token\" : \"to\\nken\",\n  \
             \"Expiration\" : \"2017-05-17T16:09:54Z\"\n}"
        );
        assert_eq!(
            body(credentials_failure(
                "AssumeRoleUnauthorizedAccess",
                "no",
                at
            )),
            "{\n  \"Code\" : \"AssumeRoleUnauthorizedAccess\",\n  \"Message\" : \"no\",\n  \
             \"LastUpdated\" : \"2017-05-17T15:09:54Z\"\n}"
        );
        assert_eq!(
            body(info("arn:aws:iam::1:instance-profile/r", "AIPA1", at)),
            "{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"2017-05-17T15:09:54Z\",\n  \
             \"InstanceProfileArn\" : \"arn:aws:iam::1:instance-profile/r\",\n  \
             \"InstanceProfileId\" : \"AIPA1\"\n}"
        );
    }

    #[test]
    fn errors_are_ec2_html_pages() {
        let response = error(StatusCode::NOT_FOUND);
        assert_eq!(response.status(), 404);
        let body =
            futures::executor::block_on(http_body_util::BodyExt::collect(response.into_body()))
                .unwrap()
                .to_bytes();
        assert!(
            std::str::from_utf8(&body)
                .unwrap()
                .contains("<title>404 - Not Found</title>")
        );
    }
}

//! Timing `GET /metrics` on the daemon's HTTP port (`attach --scrape K`):
//! K requests one after another, each plain HTTP/1.1 on a new connection
//! (`Connection: close`), timed from the connect to the end of the
//! response. Also reads one counter for modes that cross-check the
//! daemon's own count (`vmotion`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::round;

/// Limit for one scrape.
const SCRAPE_WAIT: Duration = Duration::from_secs(10);

/// What `--scrape` measured.
#[derive(Serialize)]
pub(crate) struct Scrapes {
    pub(crate) scrapes: u32,
    pub(crate) scrape_p50_ms: f64,
    pub(crate) scrape_max_ms: f64,
    /// The body of the last response, in bytes.
    pub(crate) scrape_bytes: usize,
}

/// Fetch `/metrics` from `http` `k` times (k ≥ 1).
pub(crate) async fn scrape(http: SocketAddr, k: u32) -> Result<Scrapes, String> {
    let mut times = Vec::with_capacity(k as usize);
    let mut body = 0;
    for _ in 0..k {
        let t0 = Instant::now();
        let response = tokio::time::timeout(SCRAPE_WAIT, get(http, "/metrics"))
            .await
            .map_err(|_| {
                format!(
                    "GET http://{http}/metrics took more than {} s",
                    SCRAPE_WAIT.as_secs()
                )
            })??;
        times.push(t0.elapsed());
        body = check(&response).map_err(|e| format!("GET http://{http}/metrics: {e}"))?;
    }
    times.sort_unstable();
    let ms = |d: Option<&Duration>| round(d.map_or(0.0, |d| d.as_secs_f64() * 1e3), 3);
    Ok(Scrapes {
        scrapes: k,
        scrape_p50_ms: ms(times.get(times.len().saturating_sub(1) / 2)),
        scrape_max_ms: ms(times.last()),
        scrape_bytes: body,
    })
}

/// The value of the sample `series` (name and labels, exactly as the
/// daemon prints them) in the daemon's metrics.
pub(crate) async fn metric(http: SocketAddr, series: &str) -> Result<f64, String> {
    let response = tokio::time::timeout(SCRAPE_WAIT, get(http, "/metrics"))
        .await
        .map_err(|_| format!("GET http://{http}/metrics timed out"))??;
    let body = check(&response).map_err(|e| format!("GET http://{http}/metrics: {e}"))?;
    let text = String::from_utf8_lossy(&response[response.len() - body..]);
    sample(&text, series).ok_or_else(|| format!("no {series} in http://{http}/metrics"))
}

/// `series VALUE` in Prometheus text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// One request; the whole response (the server closes after it).
async fn get(http: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect(http)
        .await
        .map_err(|e| format!("connecting to the HTTP port {http}: {e}"))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending GET {path} to {http}: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .await
        .map_err(|e| format!("reading the answer to GET {path} from {http}: {e}"))?;
    Ok(response)
}

/// A 200 answer with a body: the body's length (after any chunk framing,
/// taken as it is).
fn check(response: &[u8]) -> Result<usize, String> {
    let head_end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete answer ({} bytes)", response.len()))?;
    let status = response.split(|&b| b == b'\n').next().unwrap_or_default();
    if !status.starts_with(b"HTTP/1.1 200") {
        return Err(format!(
            "answer {:?}",
            String::from_utf8_lossy(status).trim_end()
        ));
    }
    let body = response.len() - head_end - 4;
    if body == 0 {
        return Err("an empty body".into());
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::{check, sample};

    #[test]
    fn checks_the_answer() {
        assert_eq!(
            check(b"HTTP/1.1 200 OK\r\nx: y\r\n\r\nvspc_vms 1\n"),
            Ok(11)
        );
        assert!(check(b"HTTP/1.1 401 Unauthorized\r\n\r\n{}").is_err());
        assert!(check(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(check(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
    }

    #[test]
    fn finds_a_sample() {
        let text = "# TYPE x counter\nx_total{a=\"b\"} 7\nx_total{a=\"bc\"} 9\nvspc_vms 2\n";
        assert_eq!(sample(text, "x_total{a=\"bc\"}"), Some(9.0));
        assert_eq!(sample(text, "vspc_vms"), Some(2.0));
        assert_eq!(sample(text, "vspc"), None);
    }
}

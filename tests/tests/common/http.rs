//! A real `stevedore serve` on a free loopback port, and a real HTTP client (ureq) to talk to it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running server; killed when dropped. Its stderr is kept for failure messages.
pub struct Server {
    child: Child,
    pub base: String,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `stevedore serve --port 0 ARGS...` and waits for the address it prints.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_stevedore-e2e"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("STEVEDORE_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start stevedore serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let pipe = child.stderr.take().expect("piped");
        let log = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default().to_owned();
                    let _ = tx.send(addr);
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not start:\n{}", stderr.lock().unwrap());
            }
        };
        Server { child, base: format!("http://{addr}"), stderr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (after a signal, say); its status code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < within {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the server did not exit within {within:?}:\n{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that returns every status as a response.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// A reply: status, headers we look at, body.
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn reply(mut r: ureq::http::Response<ureq::Body>) -> Reply {
    let header = |name: &str| r.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let retry_after = header("retry-after");
    let content_type = header("content-type").unwrap_or_default();
    let body = r.body_mut().with_config().limit(64 << 20).read_to_string().expect("body");
    Reply { status: r.status().as_u16(), retry_after, content_type, body }
}

/// POSTs `body` as it is, with this content type.
pub fn post_raw(url: &str, content_type: &str, body: &str, key: Option<&str>) -> Reply {
    if body.len() > 1 << 20 && key.is_none() {
        return post_oversized(url, content_type, body);
    }
    let mut req = agent().post(url).header("Content-Type", content_type);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    reply(req.send(body).expect("the request reached the server"))
}

pub fn post(url: &str, body: &Value) -> Reply {
    post_raw(url, "application/json", &body.to_string(), None)
}

pub fn get(url: &str, key: Option<&str>) -> Reply {
    let mut req = agent().get(url);
    if let Some(k) = key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    reply(req.call().expect("the request reached the server"))
}

/// A streaming request: the `data:` payloads as they arrive.
pub struct Events {
    lines: Box<dyn BufRead + Send>,
}

impl Events {
    pub fn open(url: &str, body: &Value) -> (u16, Events) {
        let r = agent()
            .post(url)
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .expect("the request reached the server");
        let status = r.status().as_u16();
        (status, Events { lines: Box::new(BufReader::new(r.into_body().into_reader())) })
    }
}

impl Iterator for Events {
    type Item = String;

    /// The next `data:` payload (`[DONE]` included); `None` when the stream ends.
    fn next(&mut self) -> Option<String> {
        loop {
            let mut line = String::new();
            if self.lines.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(data) = line.trim_end_matches(['\r', '\n']).strip_prefix("data: ") {
                return Some(data.to_owned());
            }
        }
    }
}

/// A streamed response put together: per choice index, its text and finish reason; and the
/// usage chunk, if one came. Panics unless it ends with `[DONE]` and every chunk parses.
pub fn collect_stream(events: Events) -> (Vec<(String, Option<String>)>, Option<Value>) {
    let mut choices: Vec<(String, Option<String>)> = Vec::new();
    let mut usage = None;
    let mut done = false;
    for data in events {
        assert!(!done, "data after [DONE]: {data}");
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("bad chunk ({e}): {data}"));
        assert!(v.get("error").is_none(), "error chunk: {data}");
        if v["usage"].is_object() {
            usage = Some(v["usage"].clone());
        }
        for c in v["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().unwrap() as usize;
            if choices.len() <= i {
                choices.resize(i + 1, (String::new(), None));
            }
            let text = c["delta"]["content"].as_str().or(c["text"].as_str()).unwrap_or("");
            choices[i].0.push_str(text);
            if let Some(r) = c["finish_reason"].as_str() {
                choices[i].1 = Some(r.to_owned());
            }
        }
    }
    assert!(done, "the stream did not end with [DONE]");
    (choices, usage)
}

/// The value of a metric sample in Prometheus text (`name{labels}` exactly as written, or the
/// bare name).
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok()).flatten()
    })
}

/// POSTs a large `body` over a plain socket, writing it from another thread while this one
/// reads the reply: a server may answer (413) after reading only part of it and close, and a
/// client that waits to finish writing would see a broken pipe instead of the answer.
fn post_oversized(url: &str, content_type: &str, body: &str) -> Reply {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut stream = std::net::TcpStream::connect(host).expect("the server accepts connections");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut writer = stream.try_clone().expect("a second handle on the socket");
    let payload = [head.as_bytes(), body.as_bytes()].concat();
    let sending = std::thread::spawn(move || {
        // The server may stop reading once it has its answer; that is not this test's failure.
        let _ = writer.write_all(&payload);
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => raw.extend_from_slice(&buf[..k]),
            // A reset after the answer arrived ends the reply, not the test.
            Err(_) if !raw.is_empty() => break,
            Err(e) => panic!("no reply from the server: {e}"),
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sending.join();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a complete HTTP reply head");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let header = |name: &str| {
        head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    };
    Reply {
        status,
        retry_after: header("retry-after"),
        content_type: header("content-type").unwrap_or_default(),
        body: body.to_owned(),
    }
}

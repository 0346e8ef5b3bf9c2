//! The page of `albef serve` in headless Chromium (Debian's `chromium` and `chromium-driver`,
//! driven over WebDriver): it loads, a typed query shows results with thumbnails, clicking one
//! shows it large with its Grad-CAM, and a question gets ranked answers. The screenshot is kept
//! in `target/test-artefacts/serve.png`.
//!
//! Without Chromium the test says so and passes only outside CI: with `CI=true` (where `.ci/run`
//! installs it) a missing browser fails it.

#[path = "common/serving.rs"]
mod serving;

use fantoccini::{ClientBuilder, Locator};
use serde_json::{json, Value};
use serving::{models, Server};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn which(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    names.iter().flat_map(|n| std::env::split_paths(&path).map(move |d| d.join(n))).find(|p| p.is_file())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `script` (a function body returning a value) until it returns something truthy.
async fn wait_for(client: &fantoccini::Client, what: &str, script: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = client.execute(script, vec![]).await.unwrap();
        let done = match &v {
            Value::Bool(b) => *b,
            Value::Null => false,
            Value::Number(n) => n.as_f64() != Some(0.0),
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if done {
            return v;
        }
        if Instant::now() > deadline {
            let status = client.execute("return document.body.innerText", vec![]).await.unwrap();
            panic!("timed out waiting for {what}; the page says: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn the_page_searches_and_shows_a_photo_in_headless_chromium() {
    let (Some(chromium), Some(driver)) = (which(&["chromium", "chromium-browser"]), which(&["chromedriver"])) else {
        let why = "chromium or chromedriver is not on PATH (apt-get install -y chromium chromium-driver)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("CI=true but {why}: .ci/run installs them");
        }
        eprintln!("SKIPPED the browser test: {why}");
        return;
    };
    let m = models("browser");
    let s = |p: &Path| p.display().to_string();
    let server =
        Server::start(&["--index", &s(&m.index), "--vqa-checkpoint", &s(&m.vqa), "--vqa-config", &s(&m.vqa_config)]);
    let port = free_port();
    let _driver = Killed(
        Command::new(&driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let profile = m.dir.join("chromium-profile");
    let artefacts = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("test-artefacts");
    std::fs::create_dir_all(&artefacts).unwrap();
    let shot = artefacts.join("serve.png");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let caps = json!({"goog:chromeOptions": {"binary": chromium, "args": [
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--window-size=1280,1100", format!("--user-data-dir={}", profile.display()),
        ]}});
        let mut builder = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new());
        builder.capabilities(caps.as_object().unwrap().clone());
        // chromedriver takes a moment to listen.
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let client = loop {
            match builder.connect(&url).await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("cannot start chromium through chromedriver: {e}"),
            }
        };

        // The page loads and reads the health of the server.
        client.goto(&server.url("/")).await.unwrap();
        let status = wait_for(&client, "the status line", "const t = document.getElementById('status').textContent; return t.includes('images indexed') ? t : null").await;
        assert!(status.as_str().unwrap().starts_with("8 images indexed"), "{status}");

        // A typed query shows results, each with a thumbnail that loaded.
        client.find(Locator::Id("q")).await.unwrap().send_keys("a red circle").await.unwrap();
        client.find(Locator::Id("go")).await.unwrap().click().await.unwrap();
        let n = wait_for(
            &client,
            "thumbnails",
            "const imgs = [...document.querySelectorAll('.hit img')]; \
             return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0) ? imgs.length : 0",
        )
        .await;
        assert_eq!(n, 8);
        let scores = client.execute("return [...document.querySelectorAll('.hit .score')].map(s => parseFloat(s.textContent))", vec![]).await.unwrap();
        let scores: Vec<f64> = serde_json::from_value(scores).unwrap();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "scores not best first: {scores:?}");

        // Clicking one shows it large, with the Grad-CAM of the query.
        let hits = client.find_all(Locator::Css(".hit")).await.unwrap();
        let id = hits[1].attr("data-id").await.unwrap().unwrap();
        hits[1].click().await.unwrap();
        let large = wait_for(
            &client,
            "the large image",
            "const i = document.getElementById('large'); \
             return document.getElementById('detail').offsetParent !== null && i.complete && i.naturalWidth > 0 ? i.getAttribute('src') : null",
        )
        .await;
        assert_eq!(large, format!("/api/image/{id}"));
        let w = wait_for(&client, "the Grad-CAM", "const i = document.getElementById('heat'); return i.complete && i.naturalWidth").await;
        assert_eq!(w, 96);

        // A question gets five ranked answers.
        client.find(Locator::Id("question")).await.unwrap().send_keys("what color is the circle").await.unwrap();
        client.find(Locator::Css("#ask-form button")).await.unwrap().click().await.unwrap();
        let n = wait_for(&client, "the answers", "return document.querySelectorAll('#answers li').length").await;
        assert_eq!(n, 5);

        let png = client.screenshot().await.unwrap();
        std::fs::write(&shot, &png).unwrap();
        client.close().await.unwrap();
    });
    let img = image::open(&shot).unwrap();
    assert!(img.width() >= 1000, "screenshot {}×{}", img.width(), img.height());
    eprintln!("screenshot: {}", shot.display());
    let _ = std::fs::remove_dir_all(&m.dir);
}

//! `albef serve` over HTTP on a loopback port, with tiny models trained here: every endpoint
//! answers what the library computes for the same request; bad requests (missing parameters,
//! oversized bodies, `..` paths, ids not in the index) get a 4xx with a message and the server
//! keeps serving; concurrent searches all answer; an empty index and a missing VQA model are
//! said plainly.

#[path = "common/serving.rs"]
mod serving;

use albef::data::transform::RgbImage;
use albef::tasks::gradcam::Grounder;
use albef::tasks::search::{Query, SearchOptions, Searcher};
use albef::tasks::vqa::Answerer;
use candle_core::Device;
use serde_json::json;
use serving::{get, models, post_json, request, Server};
use std::path::Path;

fn searcher(idx: &Path) -> Searcher {
    let opts = SearchOptions {
        index: idx.into(),
        checkpoint: None,
        config: None,
        text_encoder: None,
        device: Device::Cpu,
        top: 10,
        rerank: None,
    };
    Searcher::open(&opts).unwrap()
}

/// Asserts a 4xx JSON error whose message contains `needle`, and that the server still serves.
fn assert_refused(server: &mut Server, r: serving::Response, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let msg = r.error();
    assert!(msg.to_lowercase().contains(&needle.to_lowercase()), "message {msg:?} lacks {needle:?}");
    assert!(server.alive());
    assert_eq!(get(&server.addr, "/api/health").status, 200);
}

#[test]
fn serve_answers_every_endpoint_and_refuses_bad_requests() {
    let m = models("http");
    let s = |p: &Path| p.display().to_string();
    let mut server =
        Server::start(&["--index", &s(&m.index), "--vqa-checkpoint", &s(&m.vqa), "--vqa-config", &s(&m.vqa_config)]);
    let addr = server.addr.clone();

    // The page.
    let page = get(&addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").unwrap().starts_with("text/html"));
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("id=\"q\"") && html.contains("/api/search"));

    // Health.
    let h = get(&addr, "/api/health").json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["images"], 8);
    assert_eq!(h["vqa"], true);
    assert_eq!(h["gradcam"], true);

    // Search: the ranking and scores the library computes for the same query.
    let lib = searcher(&m.index);
    let query = "a red circle";
    let r = get(&addr, "/api/search?q=a%20red%20circle&k=5");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let want = lib.search(&Query::Text(query.into()), 5, None).unwrap();
    let got = v["results"].as_array().unwrap();
    assert_eq!(got.len(), 5);
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["path"], w.path.as_str());
        assert_eq!(g["rank"], w.rank);
        assert!((g["score"].as_f64().unwrap() - w.score as f64).abs() < 1e-6);
        assert_eq!(g["id"], w.row);
    }
    // Default k, and '+' as a space.
    let v = get(&addr, "/api/search?q=a+red+circle").json();
    assert_eq!(v["results"].as_array().unwrap().len(), 8, "the default k is 12; the index holds 8");
    assert_eq!(v["query"], query);

    // The image and its thumbnail, by id.
    let first = &got[0];
    let id = first["id"].as_u64().unwrap();
    let path = first["path"].as_str().unwrap().to_string();
    let img = get(&addr, first["image"].as_str().unwrap());
    assert_eq!(img.status, 200);
    assert_eq!(img.body, std::fs::read(&path).unwrap());
    let thumb = get(&addr, first["thumbnail"].as_str().unwrap());
    assert_eq!(thumb.status, 200);
    assert_eq!(thumb.header("content-type"), Some("image/jpeg"));
    let t = image::load_from_memory(&thumb.body).unwrap();
    assert_eq!((t.width(), t.height()), (96, 96), "a 96×96 photo is not enlarged");

    // VQA: the answers and probabilities the library ranks.
    let question = "what color is the circle?";
    let r = post_json(&addr, "/api/vqa", &json!({"id": id, "question": question}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answers = r.json()["answers"].as_array().unwrap().clone();
    let answerer = Answerer::load(&m.vqa_config, &m.vqa, &m.vocab, &Device::Cpu).unwrap();
    let want = answerer.answer(&RgbImage::open(Path::new(&path)).unwrap(), question, 5).unwrap();
    assert_eq!(answers.len(), 5);
    let list: Vec<String> = serde_json::from_str(&std::fs::read_to_string(&m.answer_list).unwrap()).unwrap();
    for (g, w) in answers.iter().zip(&want) {
        assert_eq!(g["answer"], w.answer.as_str());
        assert!((g["probability"].as_f64().unwrap() - w.probability as f64).abs() < 1e-6);
        assert!(list.contains(&w.answer));
    }
    let p: Vec<f64> = answers.iter().map(|a| a["probability"].as_f64().unwrap()).collect();
    assert!(p.windows(2).all(|w| w[0] >= w[1]) && p.iter().sum::<f64>() <= 1.0 + 1e-5, "{p:?}");

    // Grad-CAM: the library's picture, as PNG.
    let r = post_json(&addr, "/api/gradcam", &json!({"id": id, "text": query}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("image/png"));
    let got = image::load_from_memory(&r.body).unwrap().to_rgb8();
    let grounder = Grounder::load(&m.retrieval_config, &m.retrieval, &m.vocab, &Device::Cpu, None).unwrap();
    let want = grounder.heatmap(&RgbImage::open(Path::new(&path)).unwrap(), query, 512).unwrap();
    assert_eq!(got, want);

    // Bad requests: 4xx with a message, and the server keeps serving.
    let long = "a".repeat(300);
    for (target, status, needle) in [
        ("/api/search", 400, "missing parameter \"q\""),
        ("/api/search?q=", 400, "missing parameter"),
        ("/api/search?q=%20%20", 400, "missing parameter"),
        ("/api/search?q=dog&k=0", 400, "k=\"0\""),
        ("/api/search?q=dog&k=abc", 400, "number of results"),
        ("/api/search?q=dog&k=100000", 400, "1 to 200"),
        (&format!("/api/search?q={long}"), 400, "at most 256"),
        ("/api/image/8", 404, "no image with id 8"),
        ("/api/image/99999999999999999999", 400, "not an image id"),
        ("/api/image/-1", 400, "not an image id"),
        ("/api/thumbnail/abc", 400, "not an image id"),
        ("/api/image/..%2F..%2F..%2Fetc%2Fpasswd", 400, "not an image id"),
        ("/api/image/../../../etc/passwd", 404, "no such page"),
        ("/api/image/0/../../../../etc/passwd", 404, "no such page"),
        ("/../../etc/passwd", 404, "no such page"),
        ("/api/file?path=/etc/passwd", 404, "no such page"),
    ] {
        let r = get(&addr, target);
        assert_refused(&mut server, r, status, needle);
    }
    let big = format!("{{\"id\": 0, \"question\": \"{}\"}}", "x".repeat(20_000));
    for target in ["/api/vqa", "/api/gradcam"] {
        let r = request(&addr, "POST", target, Some(("application/json", big.as_bytes())));
        assert_refused(&mut server, r, 413, "too large");
        let r = request(&addr, "POST", target, Some(("application/json", b"{not json")));
        assert_refused(&mut server, r, 400, "json");
        let r = request(&addr, "POST", target, Some(("text/plain", b"{\"id\": 0}")));
        assert_refused(&mut server, r, 415, "content-type");
        let r = post_json(&addr, target, &json!({"question": "what?", "text": "what?"}));
        assert_refused(&mut server, r, 422, "id");
        let r = post_json(&addr, target, &json!({"id": "../../etc/passwd", "question": "what?", "text": "what?"}));
        assert_refused(&mut server, r, 422, "id");
        let r = post_json(&addr, target, &json!({"id": 8, "question": "what?", "text": "what?"}));
        assert_refused(&mut server, r, 404, "no image with id 8");
        let r = get(&addr, target);
        assert_eq!(r.status, 405, "GET {target}");
    }
    let r = post_json(&addr, "/api/vqa", &json!({"id": 0}));
    assert_refused(&mut server, r, 400, "missing parameter \"question\"");
    let r = post_json(&addr, "/api/gradcam", &json!({"id": 0, "text": long}));
    assert_refused(&mut server, r, 400, "at most 256");

    // N concurrent searches all answer, each with what it answers alone.
    let queries: Vec<String> = ["red", "blue", "green", "circle", "square", "triangle", "a small red square", "big"]
        .iter()
        .cycle()
        .take(16)
        .map(|s| s.to_string())
        .collect();
    let alone: Vec<serde_json::Value> =
        queries.iter().map(|q| get(&addr, &format!("/api/search?k=8&q={}", q.replace(' ', "+"))).json()).collect();
    let together: Vec<serde_json::Value> = std::thread::scope(|sc| {
        let handles: Vec<_> = queries
            .iter()
            .map(|q| {
                let addr = addr.clone();
                sc.spawn(move || {
                    let r = get(&addr, &format!("/api/search?k=8&q={}", q.replace(' ', "+")));
                    assert_eq!(r.status, 200);
                    r.json()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(server.alive());
    drop(server);
    let _ = std::fs::remove_dir_all(&m.dir);
}

#[test]
fn an_empty_index_and_a_missing_vqa_model_are_said_plainly() {
    let m = models("empty");
    let empty = m.dir.join("no-photos");
    std::fs::create_dir_all(&empty).unwrap();
    let idx = m.dir.join("empty.sqlite");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_albef"))
        .args(["index", "--checkpoint"])
        .arg(&m.retrieval)
        .arg("--config")
        .arg(&m.retrieval_config)
        .arg("--text_encoder")
        .arg(&m.vocab)
        .arg("--images")
        .arg(&empty)
        .arg("--index")
        .arg(&idx)
        .status()
        .unwrap();
    assert!(status.success());
    let mut server = Server::start(&["--index", &idx.display().to_string()]);
    let addr = server.addr.clone();
    let h = get(&addr, "/api/health").json();
    assert_eq!(h["images"], 0);
    assert_eq!(h["vqa"], false);
    let notes = h["messages"].to_string();
    assert!(notes.contains("holds no images") && notes.contains("albef index"), "{notes}");
    assert!(notes.contains("--vqa-checkpoint"), "{notes}");
    assert_eq!(get(&addr, "/").status, 200);
    let r = get(&addr, "/api/search?q=dog");
    assert_refused(&mut server, r, 503, "holds no images");
    let r = post_json(&addr, "/api/vqa", &json!({"id": 0, "question": "what?"}));
    assert_refused(&mut server, r, 503, "--vqa-checkpoint");
    let r = get(&addr, "/api/image/0");
    assert_refused(&mut server, r, 404, "no image with id 0");
    drop(server);

    // A VQA checkpoint without its config, and a missing one, stop the start with a message.
    let index = m.index.display().to_string();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_albef"))
            .args(["serve", "--port", "0"])
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--index", &index, "--vqa-checkpoint", &m.vqa.display().to_string()]);
    assert!(err.contains("--vqa-config"), "{err}");
    let vqa_config = m.vqa_config.display().to_string();
    let err = run(&["--index", &index, "--vqa-checkpoint", "/nonexistent/vqa.pth", "--vqa-config", &vqa_config]);
    assert!(err.contains("/nonexistent/vqa.pth"), "{err}");
    let err = run(&["--index", "/nonexistent/index.sqlite"]);
    assert!(err.contains("no index at /nonexistent/index.sqlite"), "{err}");
    let _ = std::fs::remove_dir_all(&m.dir);
}

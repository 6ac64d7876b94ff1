//! The architecture's CPU floor for `bench-cost` (issue 31): the gateway's
//! HTTP ingest path with nothing of the gateway in it.
//!
//! `cost_floor ADDR MODE [DB WINDOW_MS]`
//! - `http`: actix-web (one worker per core, as the gateway's default)
//!   answers `POST /ingest/{device}` with 202 after parsing the JSON body.
//! - `wal`: the same, and each body is inserted into a bare SQLite table
//!   (WAL mode, `synchronous=FULL`, no index) by one writer thread that
//!   group-commits what arrives within `WINDOW_MS` of a group's first
//!   record; the request is answered after its commit. The same thread hops
//!   as the gateway (worker -> writer -> worker), none of its work.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use tokio::sync::oneshot;

type Job = (Vec<u8>, oneshot::Sender<i64>);

fn writer(db: &str, window: Duration, rx: mpsc::Receiver<Job>) -> rusqlite::Result<()> {
    let mut conn = rusqlite::Connection::open(db)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute(
        "CREATE TABLE IF NOT EXISTS r(id INTEGER PRIMARY KEY, body BLOB)",
        [],
    )?;
    while let Ok(first) = rx.recv() {
        let end = Instant::now() + window;
        let mut group = vec![first];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let tx = conn.transaction()?;
        let mut ids = Vec::with_capacity(group.len());
        {
            let mut put = tx.prepare_cached("INSERT INTO r(body) VALUES(?1)")?;
            for (body, _) in &group {
                put.execute([body])?;
                ids.push(tx.last_insert_rowid());
            }
        }
        tx.commit()?;
        for ((_, reply), id) in group.into_iter().zip(ids) {
            let _ = reply.send(id);
        }
    }
    Ok(())
}

async fn ingest(body: web::Bytes, wal: web::Data<Option<mpsc::Sender<Job>>>) -> HttpResponse {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return HttpResponse::BadRequest().json(serde_json::json!({"error": "bad json"}));
    };
    let seq = match wal.get_ref() {
        Some(wal) => {
            let (tx, rx) = oneshot::channel();
            if wal
                .send((serde_json::to_vec(&value).unwrap_or_default(), tx))
                .is_err()
            {
                return HttpResponse::ServiceUnavailable().finish();
            }
            rx.await.unwrap_or(-1)
        }
        None => 0,
    };
    HttpResponse::Accepted().json(serde_json::json!({"status": "accepted", "seq": seq}))
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = || std::io::Error::other("usage: cost_floor ADDR http|wal [DB WINDOW_MS]");
    let addr = args.get(1).ok_or_else(usage)?.clone();
    let wal = match args.get(2).map(String::as_str) {
        Some("http") => None,
        Some("wal") => {
            let db = args.get(3).ok_or_else(usage)?.clone();
            let ms: u64 = args.get(4).and_then(|s| s.parse().ok()).ok_or_else(usage)?;
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                if let Err(e) = writer(&db, Duration::from_millis(ms), rx) {
                    eprintln!("cost_floor: writer: {e}");
                    std::process::exit(1);
                }
            });
            Some(tx)
        }
        _ => return Err(usage()),
    };
    let wal = web::Data::new(wal);
    HttpServer::new(move || {
        App::new()
            .app_data(wal.clone())
            .route("/ingest/{device}", web::post().to(ingest))
            .route("/readyz", web::get().to(HttpResponse::Ok))
    })
    .bind(addr)?
    .run()
    .await
}

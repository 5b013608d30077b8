//! healthCheckNodePort servers, as kube-proxy and Cilium run them for externalTrafficPolicy:
//! Local LoadBalancer Services: `GET /` on the port answers 200 while this node has a ready
//! endpoint of the Service and 503 while it has none, with kube-proxy's JSON body, so the
//! cloud or hardware load balancer in front sends only to nodes that can serve.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use log::info;

use crate::model::HealthCheck;

type Table = Arc<Mutex<BTreeMap<u16, HealthCheck>>>;

/// The running servers, one thread per port.
#[derive(Default)]
pub struct HealthChecks {
    table: Table,
    servers: BTreeMap<u16, Arc<AtomicBool>>,
}

impl HealthChecks {
    /// Serves exactly the ports of `wanted` with their current counts; returns the ports that
    /// could not be bound.
    pub fn apply(&mut self, wanted: &BTreeMap<u16, HealthCheck>) -> Vec<(u16, anyhow::Error)> {
        *self.table.lock().expect("health check table") = wanted.clone();
        let mut failed = Vec::new();
        self.servers.retain(|port, stop| {
            let keep = wanted.contains_key(port);
            if !keep {
                stop.store(true, Ordering::Relaxed);
                info!("healthCheckNodePort {port}: stopped");
            }
            keep
        });
        for (port, check) in wanted {
            if self.servers.contains_key(port) {
                continue;
            }
            match serve(*port, self.table.clone()) {
                Ok(stop) => {
                    info!("healthCheckNodePort {port}: serving {}", check.service);
                    self.servers.insert(*port, stop);
                }
                Err(e) => failed.push((*port, e)),
            }
        }
        failed
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for stop in self.servers.values() {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

fn serve(port: u16, table: Table) -> Result<Arc<AtomicBool>> {
    let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
        .with_context(|| format!("binding healthCheckNodePort {port}"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    thread::Builder::new()
        .name(format!("healthcheck-{port}"))
        .spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let check = table
                            .lock()
                            .expect("health check table")
                            .get(&port)
                            .cloned();
                        let _ = answer(conn, check);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
    Ok(stop)
}

fn answer(conn: TcpStream, check: Option<HealthCheck>) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
            break;
        }
    }
    let (count, namespace, name) = match &check {
        Some(c) => {
            let (ns, n) = c.service.split_once('/').unwrap_or(("", &c.service));
            (c.local_endpoints, ns.to_string(), n.to_string())
        }
        None => (0, String::new(), String::new()),
    };
    let body = serde_json::json!({
        "service": {"namespace": namespace, "name": name},
        "localEndpoints": count,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let (code, reason) = if count > 0 {
        (200, "OK")
    } else {
        (503, "Service Unavailable")
    };
    let mut conn = conn;
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

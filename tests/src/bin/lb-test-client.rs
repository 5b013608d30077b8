//! Test client, started by the socket-balancing tests inside a test cgroup (a process, so the
//! cgroup applies to it alone). One line per exchange on stdout:
//! `peer=<what getpeername/recv_from showed> name=<backend name>` or `error=<kind> ms=<elapsed>`.
//!
//! lb-test-client tcp|udp|udp-connected ADDR COUNT [--hold SECONDS]
//! lb-test-client rate ADDR SECONDS REQUESTS: TCP connect+request+close for SECONDS, then
//! REQUESTS on one connection; prints `connects_per_s=… p50_us=… p99_us=…` (benchmarks). Those
//! connections close with a RST (SO_LINGER 0): thousands a second would otherwise fill the
//! client's ephemeral ports with TIME_WAIT and slow every later run.
//! `--hold`: udp-connected keeps its socket and asks every 200 ms for SECONDS, connecting a new
//! socket after an error, as a resolver does (a client whose backend may go away meanwhile).

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

fn tcp(to: SocketAddr) -> std::io::Result<(SocketAddr, String)> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let peer = stream.peer_addr()?;
    (&stream).write_all(b"who\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    Ok((peer, line.trim().to_string()))
}

fn udp_ask(socket: &UdpSocket, to: Option<SocketAddr>) -> std::io::Result<(SocketAddr, String)> {
    match to {
        Some(to) => socket.send_to(b"who", to)?,
        None => socket.send(b"who")?,
    };
    let mut buf = [0u8; 256];
    let (n, from) = socket.recv_from(&mut buf)?;
    let peer = if to.is_some() {
        from
    } else {
        socket.peer_addr()?
    };
    Ok((peer, String::from_utf8_lossy(&buf[..n]).trim().to_string()))
}

fn udp(to: SocketAddr, connected: bool) -> std::io::Result<(UdpSocket, SocketAddr, String)> {
    let socket = UdpSocket::bind("0.0.0.0:0")?;
    socket.set_read_timeout(Some(Duration::from_secs(2)))?;
    if connected {
        socket.connect(to)?;
    }
    let (peer, name) = udp_ask(&socket, (!connected).then_some(to))?;
    Ok((socket, peer, name))
}

fn report(result: std::io::Result<(SocketAddr, String)>, start: Instant) {
    match result {
        Ok((peer, name)) => println!("peer={peer} name={name}"),
        Err(e) => println!("error={:?} ms={}", e.kind(), start.elapsed().as_millis()),
    }
    // Line by line: a test may read while the client runs.
    let _ = std::io::stdout().flush();
}

/// Connect+request+close rate, then request/response latency on one connection.
fn rate(to: SocketAddr, seconds: f64, requests: usize) -> std::io::Result<()> {
    let start = Instant::now();
    let mut connects = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(2)))?;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: setsockopt with a linger struct on our own socket.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&stream),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as u32,
            )
        };
        (&stream).write_all(b"who\n")?;
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line)?;
        connects += 1;
    }
    let per_s = connects as f64 / start.elapsed().as_secs_f64();
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(2))?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut rtts = Vec::with_capacity(requests);
    let mut line = String::new();
    for _ in 0..requests {
        let t = Instant::now();
        (&stream).write_all(b"who\n")?;
        line.clear();
        reader.read_line(&mut line)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    let at = |p: f64| rtts[((rtts.len() - 1) as f64 * p).round() as usize];
    println!(
        "connects_per_s={per_s:.1} p50_us={:.1} p99_us={:.1}",
        at(0.5),
        at(0.99)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("rate") {
        anyhow::ensure!(
            args.len() == 4,
            "usage: lb-test-client rate ADDR SECONDS REQUESTS"
        );
        return Ok(rate(args[1].parse()?, args[2].parse()?, args[3].parse()?)?);
    }
    anyhow::ensure!(
        args.len() >= 3,
        "usage: lb-test-client tcp|udp|udp-connected ADDR COUNT [--hold SECONDS]"
    );
    let to: SocketAddr = args[1].parse()?;
    let count: usize = args[2].parse()?;
    let hold: u64 = match args.get(3).map(String::as_str) {
        Some("--hold") => args.get(4).map_or(Ok(0), |s| s.parse())?,
        _ => 0,
    };
    for _ in 0..count {
        let start = Instant::now();
        match args[0].as_str() {
            "tcp" => report(tcp(to), start),
            "udp" => report(udp(to, false).map(|(_, p, n)| (p, n)), start),
            "udp-connected" => match udp(to, true) {
                Ok((mut socket, peer, name)) => {
                    report(Ok((peer, name)), start);
                    for _ in 0..hold * 5 {
                        std::thread::sleep(Duration::from_millis(200));
                        let start = Instant::now();
                        let result = udp_ask(&socket, None);
                        let failed = result.is_err();
                        report(result, start);
                        if failed {
                            if let Ok((fresh, _, _)) = udp(to, true) {
                                socket = fresh;
                            }
                        }
                    }
                }
                Err(e) => println!("error={:?} ms={}", e.kind(), start.elapsed().as_millis()),
            },
            other => anyhow::bail!("unknown mode {other}"),
        }
    }
    Ok(())
}

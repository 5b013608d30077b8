//! Test backend: answers every TCP line and every UDP datagram with its name; a line or
//! datagram "peer" gets its name and the address it came from ("pod-1 10.1.0.11:61234").

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, UdpSocket},
    thread,
};

fn main() -> anyhow::Result<()> {
    let mut name = String::from("backend");
    let (mut tcp, mut udp) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--name" => name = value,
            "--tcp" => tcp = Some(value),
            "--udp" => udp = Some(value),
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    if let Some(addr) = udp {
        let socket = UdpSocket::bind(&addr)?;
        let name = name.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                let answer = if buf[..n].trim_ascii() == b"peer" {
                    format!("{name} {from}\n")
                } else {
                    format!("{name}\n")
                };
                let _ = socket.send_to(answer.as_bytes(), from);
            }
        });
    }
    let listener = TcpListener::bind(tcp.as_deref().unwrap_or("0.0.0.0:8080"))?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let name = name.clone();
        thread::spawn(move || {
            let Ok(read) = stream.try_clone() else { return };
            let peer = stream
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string());
            for line in BufReader::new(read).lines() {
                let Ok(line) = line else { break };
                let answer = if line.trim() == "peer" {
                    format!("{name} {peer}\n")
                } else {
                    format!("{name}\n")
                };
                if stream.write_all(answer.as_bytes()).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

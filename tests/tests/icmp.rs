//! ICMP and fragments through the packet path (tc on default veths, no socket balancing):
//! a fragmented datagram to a ClusterIP is answered, UDP to a Service without endpoints and to a
//! backend port nobody listens on is refused (the backend's ICMP translated back), and a DF
//! packet too big for the way to the backend updates the client's path MTU to the ClusterIP.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use lb_tests::{CLUSTER_IP, Topology, sh};

const EMPTY_IP: &str = "10.96.0.20";
const CLOSED_IP: &str = "10.96.0.30";

fn config() -> String {
    format!(
        "{}---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: empty, namespace: default}}\nspec:\n  clusterIP: {EMPTY_IP}\n  ports:\n  - {{name: udp, port: 53, targetPort: 8053, protocol: UDP}}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {{name: closed, namespace: default}}\nspec:\n  clusterIP: {CLOSED_IP}\n  ports:\n  - {{name: udp, port: 53, targetPort: 9999, protocol: UDP}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: closed-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: closed}}\n\
         addressType: IPv4\nports:\n- {{name: udp, port: 9999, protocol: UDP}}\nendpoints:\n- addresses: [\"10.0.1.2\"]\n  conditions: {{ready: true}}\n",
        Topology::service_yaml(&[1])
    )
}

/// A connected UDP socket's first exchange: the reply, or the error the kernel reports.
fn connected_udp(
    to: SocketAddr,
    size: usize,
    dont_fragment: bool,
) -> (UdpSocket, std::io::Result<String>) {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    if dont_fragment {
        let on: libc::c_int = libc::IP_PMTUDISC_DO;
        // SAFETY: setsockopt with a c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0);
    }
    socket.connect(to).unwrap();
    let mut payload = vec![b'x'; size];
    payload[..3].copy_from_slice(b"who");
    let result = socket.send(&payload).and_then(|_| {
        let mut buf = [0u8; 256];
        let n = socket.recv(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string())
    });
    (socket, result)
}

fn path_mtu(socket: &UdpSocket) -> i32 {
    let mut mtu: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as u32;
    // SAFETY: getsockopt into a c_int.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "IP_MTU: {}", std::io::Error::last_os_error());
    mtu
}

#[test]
fn fragments_icmp_errors_and_path_mtu_through_a_cluster_ip() {
    let mut topo = Topology::new(1).expect("topology");
    topo.write_config(&config()).expect("config");
    topo.start_agent(&[]).expect("agent");
    let vip: SocketAddr = format!("{CLUSTER_IP}:53").parse().unwrap();

    // 3000 bytes over a 1500-byte link: the client's kernel sends fragments; every one reaches
    // the backend, which reassembles and answers.
    let (_, answer) = topo.client(move || connected_udp(vip, 3000, false));
    assert_eq!(answer.expect("fragmented datagram answered"), "backend-1");

    // No endpoints: ICMP port unreachable from the node, reported on the connected socket.
    let empty: SocketAddr = format!("{EMPTY_IP}:53").parse().unwrap();
    let (_, answer) = topo.client(move || connected_udp(empty, 10, false));
    let err = answer.expect_err("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // The backend's own port unreachable (nothing on 9999), translated back to the ClusterIP.
    let closed: SocketAddr = format!("{CLOSED_IP}:53").parse().unwrap();
    let (_, answer) = topo.client(move || connected_udp(closed, 10, false));
    let err = answer.expect_err("refused by the backend");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    // Path MTU: the link to the backend carries 1300 bytes. A 1400-byte DF datagram gets
    // "fragmentation needed" back about the packet as the client sent it.
    let b = &topo.backends[0];
    sh(&format!("ip -n {} link set b1 mtu 1300", topo.node)).unwrap();
    sh(&format!("ip -n {b} link set eth0 mtu 1300")).unwrap();
    // Next hops (and their MTU) are cached for a second.
    std::thread::sleep(Duration::from_millis(1100));
    let (before, after) = topo.client(move || {
        let (socket, _) = connected_udp(vip, 1400, true);
        let before = 1500;
        std::thread::sleep(Duration::from_millis(200));
        (before, path_mtu(&socket))
    });
    println!("path MTU to {vip}: {before} → {after}");
    assert_eq!(
        after, 1300,
        "the client's path MTU to the ClusterIP did not update"
    );
    // And a datagram that fits still gets through.
    let (_, answer) = topo.client(move || connected_udp(vip, 1200, true));
    assert_eq!(answer.expect("fits"), "backend-1");
}

/// "Fragmentation needed" sent by the backend host about the client's packet (quoting
/// client → backend as it arrived there) is translated back on its way through the node, so the
/// client's path MTU to the ClusterIP drops to the MTU it names.
#[test]
fn fragmentation_needed_from_the_backend_updates_the_client_path_mtu() {
    let mut topo = Topology::new(1).expect("topology");
    topo.write_config(&config()).expect("config");
    topo.start_agent(&[]).expect("agent");
    let vip: SocketAddr = format!("{CLUSTER_IP}:53").parse().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<u16>();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let client = std::thread::spawn({
        let ns = topo.client.clone();
        move || {
            lb_tests::in_netns(&ns, move || {
                let (socket, answer) = connected_udp(vip, 100, true);
                assert_eq!(answer.expect("answered"), "backend-1");
                tx.send(socket.local_addr().unwrap().port()).unwrap();
                done_rx.recv().unwrap();
                std::thread::sleep(Duration::from_millis(200));
                path_mtu(&socket)
            })
        }
    });
    let port = rx.recv().unwrap();
    lb_tests::in_netns(&topo.backends[0].clone(), move || {
        send_frag_needed(port, 1200)
    });
    done_tx.send(()).unwrap();
    let mtu = client.join().unwrap();
    assert_eq!(
        mtu, 1200,
        "the client's path MTU to {vip} did not follow the backend's ICMP"
    );
}

/// From the backend (10.0.1.2): ICMP fragmentation needed (MTU `mtu`) about the UDP datagram
/// 10.0.0.1:`port` → 10.0.1.2:8053, through a raw socket.
fn send_frag_needed(port: u16, mtu: u16) {
    use pnet::packet::util::checksum;
    let mut quoted = [0u8; 28];
    quoted[0] = 0x45;
    quoted[2..4].copy_from_slice(&128u16.to_be_bytes());
    quoted[6] = 0x40; // DF
    quoted[8] = 63;
    quoted[9] = 17;
    quoted[12..16].copy_from_slice(&[10, 0, 0, 1]);
    quoted[16..20].copy_from_slice(&[10, 0, 1, 2]);
    let sum = checksum(&quoted[..20], 5);
    quoted[10..12].copy_from_slice(&sum.to_be_bytes());
    quoted[20..22].copy_from_slice(&port.to_be_bytes());
    quoted[22..24].copy_from_slice(&8053u16.to_be_bytes());
    quoted[24..26].copy_from_slice(&108u16.to_be_bytes());
    let mut icmp = vec![3u8, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(&quoted);
    let sum = checksum(&icmp, 1);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut packet = vec![
        0x45u8, 0, 0, 0, 0, 0, 0, 0, 64, 1, 0, 0, 10, 0, 1, 2, 10, 0, 0, 1,
    ];
    packet.extend_from_slice(&icmp);
    let total = packet.len() as u16;
    packet[2..4].copy_from_slice(&total.to_be_bytes());
    // SAFETY: a raw socket of our own, closed below; the kernel fills the IP checksum.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes([10, 0, 0, 1]),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(n, packet.len() as isize, "sendto: {err}");
    }
}

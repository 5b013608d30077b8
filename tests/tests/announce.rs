//! One announcer per address on a two-node cluster of namespaces: both agents watch the same
//! API server double; every LoadBalancer address is answered by exactly one node (the
//! rendezvous owner), and moves to the other node when its agent stops, its link goes down or
//! it is killed, within the targets (graceful ≤ 1 s, crash ≤ 3 s), never answered twice.

use std::time::Duration;

use lb_tests::{
    Conversation, Topology,
    apiserver::ApiServer,
    cluster::Cluster,
    l2cluster::{Macs, SERVICES, address, handover, objects, owner, wait_settled},
    sh,
};

#[test]
fn each_address_has_one_announcer_and_moves_within_the_targets() {
    let mut cluster = Cluster::new().unwrap();
    let api = ApiServer::serve(cluster.api_listener()).unwrap();
    objects(&api);
    let kubeconfig = cluster.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let kubeconfig = kubeconfig.display().to_string();
    cluster.start_agent(0, &kubeconfig).unwrap();
    cluster.start_agent(1, &kubeconfig).unwrap();
    let macs = Macs(
        cluster
            .nodes
            .iter()
            .map(|n| Topology::mac_of(&n.ns, "eth1").unwrap())
            .collect(),
    );
    wait_settled(&cluster, &macs, &[0, 1], "both agents up");
    // The rendezvous spreads the addresses: both nodes own some.
    let owners: Vec<usize> = (0..SERVICES).map(|i| owner(address(i), &[0, 1])).collect();
    println!("owners: {owners:?}");
    // Traffic to each address reaches the owner's own pod (externalTrafficPolicy: Local).
    for (i, owner) in owners.iter().enumerate() {
        let to = format!("{}:80", address(i)).parse().unwrap();
        let name = lb_tests::in_netns(&cluster.client, move || {
            Conversation::open(to).and_then(|mut c| c.ask()).unwrap()
        });
        assert_eq!(name, format!("pod-{}", owner + 1), "{}", address(i));
    }
    // Node Leases: writes grow with nodes, not Services.
    let writes_before = api.lock().count(
        "PUT /apis/coordination.k8s.io/v1/namespaces/kube-system/leases/lb-agent-node-",
        "",
    );
    std::thread::sleep(Duration::from_secs(3));
    let writes = api.lock().count(
        "PUT /apis/coordination.k8s.io/v1/namespaces/kube-system/leases/lb-agent-node-",
        "",
    ) - writes_before;
    println!("node Lease writes in 3 s: {writes} (2 nodes)");
    assert!(
        (5..=8).contains(&writes),
        "{writes} node Lease writes in 3 s (one a second a node)"
    );

    let a = address(0);
    let x = owners[0];
    let y = 1 - x;

    // Graceful: the agent stops.
    let took = handover(&mut cluster, &macs, a, y, |c| {
        c.signal_agent(x, libc::SIGTERM).unwrap()
    });
    println!("graceful stop: {a} answered by node {y} after {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "graceful hand-over took {took:?}"
    );
    cluster.start_agent(x, &kubeconfig).unwrap();
    wait_settled(&cluster, &macs, &[0, 1], "agent back");

    // Link down: the node gives its addresses up at once.
    let ns = cluster.nodes[x].ns.clone();
    let took = handover(&mut cluster, &macs, a, y, |_| {
        sh(&format!("ip -n {ns} link set eth1 down")).unwrap()
    });
    println!("link down: {a} answered by node {y} after {took:?}");
    assert!(
        took <= Duration::from_secs(1),
        "link-down hand-over took {took:?}"
    );
    let took = handover(&mut cluster, &macs, a, x, |_| {
        sh(&format!("ip -n {ns} link set eth1 up")).unwrap()
    });
    println!("link up: {a} back on node {x} after {took:?}");
    wait_settled(&cluster, &macs, &[0, 1], "link up");

    // Crash: kill -9; the Lease expires and the dead node's datapath stops answering.
    let took = handover(&mut cluster, &macs, a, y, |c| {
        c.signal_agent(x, libc::SIGKILL).unwrap()
    });
    println!("kill -9: {a} answered by node {y} after {took:?}");
    assert!(
        took <= Duration::from_secs(3),
        "crash hand-over took {took:?}"
    );
    wait_settled(&cluster, &macs, &[y], "one node left");

    // deploy/rbac.yaml grants exactly what the two agents asked the API server for.
    let used = api.lock().permissions_used();
    let granted = lb_tests::deploy::granted().unwrap();
    assert_eq!(
        used, granted,
        "requests needed {used:?}\ndeploy/rbac.yaml grants {granted:?}"
    );
}

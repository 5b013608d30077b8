//! deploy/: every manifest reads into its k8s-openapi (or our CRD) type without losing a field,
//! the CRDs are what `lb-agent crds` prints, and the DaemonSet runs the agent as documented.

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use lb_tests::{
    deploy::{documents, typed},
    sibling_binary,
};
use lb_userspace::crd::{L2AnnouncementPolicy, LoadBalancerIPPool};

#[test]
fn every_manifest_reads_into_its_type() {
    let mut kinds = Vec::new();
    for file in [
        "crds.yaml",
        "rbac.yaml",
        "daemonset.yaml",
        "example-l2.yaml",
    ] {
        for doc in documents(file).unwrap() {
            let kind = doc["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "CustomResourceDefinition" => {
                    drop(typed::<CustomResourceDefinition>(&doc).unwrap())
                }
                "ServiceAccount" => drop(typed::<ServiceAccount>(&doc).unwrap()),
                "ClusterRole" => drop(typed::<ClusterRole>(&doc).unwrap()),
                "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&doc).unwrap()),
                "Role" => drop(typed::<Role>(&doc).unwrap()),
                "RoleBinding" => drop(typed::<RoleBinding>(&doc).unwrap()),
                "ConfigMap" => drop(typed::<ConfigMap>(&doc).unwrap()),
                "DaemonSet" => drop(typed::<DaemonSet>(&doc).unwrap()),
                "LoadBalancerIPPool" => drop(typed::<LoadBalancerIPPool>(&doc).unwrap()),
                "L2AnnouncementPolicy" => drop(typed::<L2AnnouncementPolicy>(&doc).unwrap()),
                other => panic!("{file}: unexpected kind {other}"),
            }
            kinds.push(kind);
        }
    }
    assert_eq!(kinds.len(), 11, "{kinds:?}");
}

#[test]
fn crds_are_what_the_agent_prints() {
    let path = format!("{}/../deploy/crds.yaml", env!("CARGO_MANIFEST_DIR"));
    assert_eq!(
        std::fs::read_to_string(path).unwrap(),
        lb_userspace::crd::crds_yaml().unwrap(),
        "deploy/crds.yaml is stale: lb-agent crds > deploy/crds.yaml"
    );
}

#[test]
fn the_daemonset_runs_the_agent_as_documented() {
    let doc = documents("daemonset.yaml")
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "DaemonSet")
        .unwrap();
    let ds: DaemonSet = typed(&doc).unwrap();
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.host_pid,
        Some(true),
        "sock_diag needs the pods' network namespaces"
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("lb-agent"));
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "must run on every node"
    );
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap();
    // Every flag is one lb-agent knows.
    let help = std::process::Command::new(sibling_binary("lb-agent"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for arg in &args {
        let flag = arg.split('=').next().unwrap();
        assert!(
            help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
            "{flag} not in lb-agent --help"
        );
    }
    assert!(args.contains(&"--kubernetes".to_string()));
    let port = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-addr=0.0.0.0:"))
        .unwrap();
    for (probe, path) in [
        (&c.liveness_probe, "/healthz"),
        (&c.readiness_probe, "/readyz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port.parse().unwrap())
        );
    }
    let env = c.env.clone().unwrap();
    let node_name = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node_name
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let caps = c
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(caps.drop.clone().unwrap(), ["ALL"]);
    assert_eq!(
        caps.add.clone().unwrap(),
        [
            "BPF",
            "NET_ADMIN",
            "NET_RAW",
            "SYS_ADMIN",
            "SYS_PTRACE",
            "PERFMON"
        ]
    );
}

#[test]
fn lbctl_completions_cover_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(sibling_binary("lbctl"))
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let script = String::from_utf8(out.stdout).unwrap();
        for command in [
            "services",
            "backends",
            "conntrack",
            "stats",
            "maglev",
            "arp",
            "pools",
            "interfaces",
            "status",
        ] {
            assert!(
                script.contains(command),
                "{shell} completions lack {command}"
            );
        }
    }
}

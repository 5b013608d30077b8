//! `--kubernetes`: Services, EndpointSlices, our pools and L2 policies and this node's Node,
//! followed with kube-rs watchers (list, then watch from its resourceVersion; relist after 410
//! Gone; backoff on errors). Each kind is kept in a sorted map that a relist replaces at once
//! (watcher Init … InitDone), and nothing is built before every kind has listed once, so a
//! partial list never deletes Services. While the API server is away the last state stays.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        watcher::{self, Event},
    },
};
use log::{info, warn};
use serde::de::DeserializeOwned;
use tokio::{sync::Notify, task::JoinHandle};

use super::{
    Built,
    ipam::{Ipam, LeaseTiming, Snapshot},
    membership::{AnnounceTiming, Membership},
};
use crate::{
    config::{
        self, BuildContext, ConfigErrors, DesiredCache, Objects, slice::Slice, status_ingress_ips,
    },
    lbipam::{self, IpPool, L2AnnouncementPolicy, L2Policy, LoadBalancerIPPool},
    metrics::Metrics,
};

/// The label selector kube-proxy lists Services and EndpointSlices with: Services another proxy
/// serves and headless Services are not ours.
pub const PROXY_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// How to reach the API server.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// `--kubeconfig`; else KUBECONFIG; else the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// `--api-server`: the API server's URL, instead of the kubeconfig's or (in-cluster)
    /// KUBERNETES_SERVICE_HOST, which is usually the ClusterIP this agent itself programs.
    pub api_server: Option<String>,
}

impl Connection {
    pub async fn client(&self) -> Result<Client> {
        let mut config = if let Some(path) = &self.kubeconfig {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        } else if std::env::var_os("KUBECONFIG").is_some() {
            kube::Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .context("KUBECONFIG")?
        } else if self.api_server.is_some() {
            // Token and CA of the service account; the address comes from --api-server.
            kube::Config::incluster_dns().context("in-cluster service account")?
        } else {
            kube::Config::incluster().context(
                "in-cluster config (no --kubeconfig, no KUBECONFIG, no KUBERNETES_SERVICE_HOST)",
            )?
        };
        if let Some(url) = &self.api_server {
            config.cluster_url = url
                .parse()
                .with_context(|| format!("--api-server {url:?} is not a URL"))?;
        }
        Client::try_from(config).context("Kubernetes client")
    }
}

/// Objects of one kind by "namespace/name" (cluster-scoped: "name"), with their
/// resourceVersion.
struct Kind<T> {
    objects: BTreeMap<String, Versioned<T>>,
    /// Filled between a watcher's Init and InitDone.
    relist: Option<BTreeMap<String, Versioned<T>>>,
    /// Listed completely at least once (or known not to be served: a CRD not installed).
    synced: bool,
}

impl<T> Default for Kind<T> {
    fn default() -> Self {
        Kind {
            objects: BTreeMap::new(),
            relist: None,
            synced: false,
        }
    }
}

struct Versioned<T> {
    version: Option<String>,
    object: Arc<T>,
}

#[derive(Default)]
struct Stores {
    services: Kind<Service>,
    endpoint_slices: Kind<Slice>,
    pools: Kind<IpPool>,
    policies: Kind<L2Policy>,
    node: Kind<Node>,
}

impl Stores {
    fn synced(&self) -> bool {
        self.services.synced
            && self.endpoint_slices.synced
            && self.pools.synced
            && self.policies.synced
            && self.node.synced
    }
}

struct Shared {
    stores: Mutex<Stores>,
    changed: Notify,
    /// LoadBalancer addresses of the last build, by "namespace/name": a Service update that
    /// only writes them to its status (the IPAM leader's own write) needs no rebuild.
    allocated: Mutex<HashMap<String, Vec<std::net::Ipv4Addr>>>,
    /// API errors counted, changes queued for `/healthz`.
    metrics: Metrics,
}

pub struct KubeSource {
    shared: Arc<Shared>,
    server: String,
    client: Client,
    tasks: Vec<JoinHandle<()>>,
    cache: DesiredCache,
    /// The objects of the last build without errors: an object that turns bad stays at this
    /// version.
    last_good: Arc<Objects>,
    /// Whether the last [`KubeSource::build`] found every kind synced (logged once).
    announced_sync: bool,
    ipam: Ipam,
    membership: Membership,
}

impl KubeSource {
    /// Starts the watchers (they run until the source is dropped) and the IPAM Lease
    /// contender (identity: the node name; Lease in `lease_namespace`).
    pub async fn start(
        connection: &Connection,
        node_name: &str,
        lease_namespace: &str,
        timing: LeaseTiming,
        announce: AnnounceTiming,
        deadline: Option<crate::maps::AnnounceDeadline>,
        metrics: &Metrics,
    ) -> Result<Self> {
        let client = connection.client().await?;
        let shared = Arc::new(Shared {
            stores: Mutex::new(Stores::default()),
            changed: Notify::new(),
            allocated: Mutex::default(),
            metrics: metrics.clone(),
        });
        let proxied = watcher::Config::default().labels(PROXY_SELECTOR);
        let tasks = vec![
            follow(
                Api::<Service>::all(client.clone()),
                proxied.clone(),
                shared.clone(),
                |s| &mut s.services,
                |s| s,
                status_only,
            ),
            follow(
                Api::<EndpointSlice>::all(client.clone()),
                proxied,
                shared.clone(),
                |s| &mut s.endpoint_slices,
                Slice::from,
                never,
            ),
            follow(
                Api::<LoadBalancerIPPool>::all(client.clone()),
                watcher::Config::default(),
                shared.clone(),
                |s| &mut s.pools,
                |p| IpPool {
                    metadata: p.metadata,
                    spec: p.spec,
                },
                never,
            ),
            follow(
                Api::<L2AnnouncementPolicy>::all(client.clone()),
                watcher::Config::default(),
                shared.clone(),
                |s| &mut s.policies,
                |p| L2Policy {
                    metadata: p.metadata,
                    spec: p.spec,
                },
                never,
            ),
            follow(
                Api::<Node>::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={node_name}")),
                shared.clone(),
                |s| &mut s.node,
                |n| n,
                never,
            ),
        ];
        Ok(KubeSource {
            shared,
            server: server_of(connection),
            tasks,
            cache: DesiredCache::default(),
            last_good: Arc::default(),
            announced_sync: false,
            ipam: Ipam::start(client.clone(), lease_namespace, node_name, timing, metrics),
            membership: Membership::start(
                client.clone(),
                lease_namespace,
                node_name,
                announce,
                deadline,
                metrics,
            ),
            client,
        })
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Returns when a watcher changed a store since the last call (several changes meanwhile
    /// coalesce into one wake-up).
    pub async fn changed(&mut self) {
        self.shared.changed.notified().await;
    }

    pub fn build(&mut self, ctx: &BuildContext) -> Option<Result<Built, ConfigErrors>> {
        let objects = {
            let stores = self.shared.stores.lock().expect("store lock");
            if !stores.synced() {
                return None;
            }
            Objects {
                services: plain(&stores.services),
                endpoint_slices: plain(&stores.endpoint_slices),
                pools: named(&stores.pools, "LoadBalancerIPPool"),
                l2_policies: named(&stores.policies, "L2AnnouncementPolicy"),
                ignored: Vec::new(),
            }
        };
        if !self.announced_sync {
            self.announced_sync = true;
            info!(
                "kubernetes: initial lists complete ({} Services, {} EndpointSlices, {} pools, {} L2 policies)",
                objects.services.len(),
                objects.endpoint_slices.len(),
                objects.pools.len(),
                objects.l2_policies.len()
            );
        }
        // The addresses in Service status are the allocation every agent starts from, so all
        // nodes compute the same one whoever wrote it.
        let ctx = BuildContext {
            lb_hints: status_hints(&objects.services),
            ..ctx.clone()
        };
        let services = objects.services.clone();
        let built = config::build_tolerant(&mut self.cache, objects, &ctx, &mut self.last_good);
        Some(built.map(|t| {
            *self.shared.allocated.lock().expect("allocated") = t
                .desired
                .lb_status
                .iter()
                .map(|s| (s.service.clone(), s.addresses.clone()))
                .collect();
            self.ipam.publish(Snapshot {
                services,
                lb_status: t.desired.lb_status.clone(),
                pool_usage: t.desired.pool_usage.clone(),
            });
            Built {
                desired: t.desired,
                ignored: Vec::new(),
                set_aside: t.set_aside,
            }
        }))
    }

    /// Whether this agent holds the IPAM Lease (writes status).
    pub fn ipam_leader(&self) -> bool {
        self.ipam.is_leader()
    }

    /// Which node answers for which address.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// Gives the IPAM Lease up and deletes this node's Lease, for a stopping agent (which has
    /// stopped answering ARP first).
    pub async fn stop(&mut self) {
        self.membership.stop().await;
        self.ipam.stop().await;
    }

    /// This node's labels (empty when its Node object does not exist), once listed.
    pub fn node_labels(&self) -> Option<BTreeMap<String, String>> {
        let stores = self.shared.stores.lock().expect("store lock");
        if !stores.node.synced {
            return None;
        }
        Some(
            stores
                .node
                .objects
                .values()
                .next()
                .map(|n| n.object.labels().clone())
                .unwrap_or_default(),
        )
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Kinds where every change counts.
fn never<T>(_: &Shared, _: &T, _: &T) -> bool {
    false
}

/// A Service update that changes nothing the build reads: only its status, and its
/// LoadBalancer addresses there are what the last build allocated (or it is not ours and
/// they did not change).
fn status_only(shared: &Shared, old: &Service, new: &Service) -> bool {
    if old.spec != new.spec
        || old.metadata.labels != new.metadata.labels
        || old.metadata.annotations != new.metadata.annotations
    {
        return false;
    }
    let ingress = status_ingress_ips(new);
    if ingress == status_ingress_ips(old) {
        return true;
    }
    let name = format!(
        "{}/{}",
        new.metadata.namespace.as_deref().unwrap_or("default"),
        new.metadata.name.as_deref().unwrap_or_default()
    );
    shared
        .allocated
        .lock()
        .expect("allocated")
        .get(&name)
        .is_some_and(|a| *a == ingress)
}

/// "namespace/name" → the IPv4 addresses in the status of each LoadBalancer Service of ours.
fn status_hints(services: &[Arc<Service>]) -> BTreeMap<String, Vec<std::net::Ipv4Addr>> {
    services
        .iter()
        .filter(|s| {
            s.spec.as_ref().is_some_and(|spec| {
                spec.type_.as_deref() == Some("LoadBalancer")
                    && lbipam::our_class(spec.load_balancer_class.as_deref())
            })
        })
        .filter_map(|s| {
            let ips = status_ingress_ips(s);
            let name = s.metadata.name.as_deref()?;
            let namespace = s.metadata.namespace.as_deref().unwrap_or("default");
            (!ips.is_empty()).then(|| (format!("{namespace}/{name}"), ips))
        })
        .collect()
}

fn server_of(connection: &Connection) -> String {
    connection
        .api_server
        .clone()
        .or_else(|| {
            connection
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
        })
        .unwrap_or_else(|| "in-cluster".to_string())
}

fn plain<T>(kind: &Kind<T>) -> Vec<Arc<T>> {
    kind.objects.values().map(|v| v.object.clone()).collect()
}

fn named<T>(kind: &Kind<T>, name: &str) -> Vec<(String, Arc<T>)> {
    kind.objects
        .values()
        .map(|v| (name.to_string(), v.object.clone()))
        .collect()
}

fn key<K: Resource>(o: &K) -> String {
    let meta = o.meta();
    let name = meta.name.as_deref().unwrap_or_default();
    match &meta.namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// Runs one kind's watcher into its store until aborted.
fn follow<K, T>(
    api: Api<K>,
    config: watcher::Config,
    shared: Arc<Shared>,
    kind: fn(&mut Stores) -> &mut Kind<T>,
    convert: fn(K) -> T,
    quiet: fn(&Shared, &T, &T) -> bool,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
    T: Send + Sync + 'static,
{
    let what = K::kind(&K::DynamicType::default()).to_string();
    tokio::spawn(async move {
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let changed = {
                let mut stores = shared.stores.lock().expect("store lock");
                let store = kind(&mut stores);
                match event {
                    Ok(Event::Init) => {
                        store.relist = Some(BTreeMap::new());
                        false
                    }
                    Ok(Event::InitApply(o)) => {
                        let k = key(&o);
                        let version = o.meta().resource_version.clone();
                        // An object the relist returns unchanged keeps its Arc, so the build
                        // sees it as untouched.
                        let object = match store.objects.get(&k) {
                            Some(old) if version.is_some() && old.version == version => {
                                old.object.clone()
                            }
                            _ => Arc::new(convert(o)),
                        };
                        store
                            .relist
                            .get_or_insert_default()
                            .insert(k, Versioned { version, object });
                        false
                    }
                    Ok(Event::InitDone) => {
                        let relist = store.relist.take().unwrap_or_default();
                        let changed = !store.synced
                            || relist.len() != store.objects.len()
                            || relist.iter().zip(&store.objects).any(|((k1, a), (k2, b))| {
                                k1 != k2 || !Arc::ptr_eq(&a.object, &b.object)
                            });
                        store.objects = relist;
                        if !store.synced {
                            info!("kubernetes: {what}: {} listed", store.objects.len());
                        }
                        store.synced = true;
                        changed
                    }
                    Ok(Event::Apply(o)) => {
                        let version = o.meta().resource_version.clone();
                        let k = key(&o);
                        if version.is_some()
                            && store
                                .objects
                                .get(&k)
                                .is_some_and(|old| old.version == version)
                        {
                            false
                        } else {
                            let object = Arc::new(convert(o));
                            let rebuild = store
                                .objects
                                .get(&k)
                                .is_none_or(|old| !quiet(&shared, &old.object, &object));
                            store.objects.insert(k, Versioned { version, object });
                            rebuild
                        }
                    }
                    Ok(Event::Delete(o)) => store.objects.remove(&key(&o)).is_some(),
                    Err(e) => {
                        // A CRD that is not installed: nothing of that kind exists (the
                        // watcher keeps retrying and lists it once it is installed).
                        let missing = matches!(&e,
                            watcher::Error::InitialListFailed(kube::Error::Api(s)) if s.code == 404);
                        if missing && !store.synced {
                            warn!(
                                "kubernetes: {what}: not served (CRD not installed? `lb-agent crds | kubectl apply -f -`); taken as none"
                            );
                            store.synced = true;
                            true
                        } else {
                            shared.metrics.api_errors.inc();
                            warn!(
                                "kubernetes: {what}: {e}; retrying with backoff, last state kept"
                            );
                            false
                        }
                    }
                }
            };
            if changed {
                shared.metrics.health.queue();
                shared.changed.notify_one();
            }
        }
    })
}

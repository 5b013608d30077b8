//! The YAML stream: split into documents, each parsed into a Kubernetes type once and cached
//! by the hash of its text.

use super::*;

/// One parsed document, kept by [`ConfigCache`] while its text stays the same.
#[derive(Clone)]
pub(super) enum Parsed {
    Null,
    Service(Arc<Service>),
    Slice(Arc<slice::Slice>),
    Pool(String, Arc<IpPool>),
    Policy(String, Arc<L2Policy>),
    /// "Kind ns/name (apiVersion)" of a kind we do not handle.
    Ignored(String),
    /// A `v1 List` (what `kubectl get -o yaml` writes): its items; an empty one is how a file
    /// says "no Services" on purpose.
    List(Vec<Parsed>),
}

/// Splits a multi-document YAML stream at its `---` lines (document ends `...` dropped), so each
/// document can be parsed, and cached, on its own.
pub(super) fn split_documents(text: &str) -> Vec<&str> {
    // Marker lines start with "---" or "...": find those line starts with a SIMD substring
    // search instead of walking 200k lines of a big file.
    let bytes = text.as_bytes();
    let mut starts: Vec<usize> = memchr::memmem::find_iter(bytes, b"\n---")
        .chain(memchr::memmem::find_iter(bytes, b"\n..."))
        .map(|i| i + 1)
        .collect();
    if text.starts_with("---") || text.starts_with("...") {
        starts.push(0);
    }
    starts.sort_unstable();
    let mut docs = Vec::new();
    let mut start = 0;
    for offset in starts {
        let end = memchr::memchr(b'\n', &bytes[offset..]).map_or(text.len(), |i| offset + i + 1);
        let trimmed = text[offset..end].trim_end();
        if trimmed == "---" || trimmed.starts_with("--- ") || trimmed == "..." {
            docs.push(&text[start..offset]);
            // Content after "--- " on the marker line belongs to the next document.
            start = if trimmed.starts_with("--- ") {
                offset + 4
            } else {
                end
            };
        }
    }
    docs.push(&text[start..]);
    docs
}

pub(super) fn parse_document(text: &str, doc: &str) -> Result<Parsed, ConfigError> {
    let value: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| err(doc, "", format!("invalid YAML: {e}")))?;
    if value.is_null() {
        return Ok(Parsed::Null);
    }
    parse_value(value, doc)
}

fn parse_value(value: serde_yaml_ng::Value, doc: &str) -> Result<Parsed, ConfigError> {
    if value["apiVersion"].as_str() == Some("v1") && value["kind"].as_str() == Some("List") {
        let items = match &value["items"] {
            serde_yaml_ng::Value::Sequence(items) => items.clone(),
            serde_yaml_ng::Value::Null => Vec::new(),
            _ => return Err(err(doc, "items", "not a list")),
        };
        return items
            .into_iter()
            .enumerate()
            .map(|(i, item)| parse_value(item, &format!("{doc} items[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map(Parsed::List);
    }
    let api_version = value["apiVersion"].as_str().unwrap_or("").to_string();
    let Some(kind) = value["kind"].as_str().map(str::to_string) else {
        return Err(err(doc, "kind", "missing"));
    };
    let object = format!("{kind} {}", object_name(&value));
    Ok(match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => Parsed::Service(Arc::new(typed(value, &object)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            Parsed::Slice(Arc::new(typed::<EndpointSlice>(value, &object)?.into()))
        }
        // lb.xdp.rs/v1alpha1 is the served version; v1, which earlier releases read, still works.
        ("lb.xdp.rs/v1alpha1" | "lb.xdp.rs/v1", "LoadBalancerIPPool")
        | ("cilium.io/v2alpha1" | "cilium.io/v2", "CiliumLoadBalancerIPPool") => {
            let object = format!("{kind} {}", cluster_name(&object));
            Parsed::Pool(kind, Arc::new(typed(value, &object)?))
        }
        ("lb.xdp.rs/v1alpha1" | "lb.xdp.rs/v1", "L2AnnouncementPolicy")
        | ("cilium.io/v2alpha1" | "cilium.io/v2", "CiliumL2AnnouncementPolicy") => {
            let object = format!("{kind} {}", cluster_name(&object));
            Parsed::Policy(kind, Arc::new(typed(value, &object)?))
        }
        (_, "LoadBalancerIPPool" | "L2AnnouncementPolicy") => {
            return Err(err(
                object,
                "apiVersion",
                format!("{api_version:?} not supported (lb.xdp.rs/v1alpha1)"),
            ));
        }
        (_, "Service" | "EndpointSlice") => {
            return Err(err(
                object,
                "apiVersion",
                format!(
                    "{api_version:?} not supported (Service is v1, EndpointSlice is discovery.k8s.io/v1)"
                ),
            ));
        }
        // Our own group has two kinds: anything else there is a typo, not a foreign object.
        (v, _) if v.starts_with("lb.xdp.rs/") => {
            return Err(err(
                object,
                "kind",
                format!("{kind:?} is not a kind of {v} (LoadBalancerIPPool, L2AnnouncementPolicy)"),
            ));
        }
        // Kinds of other groups (a Deployment in the same manifest bundle) are skipped, said.
        _ => Parsed::Ignored(format!("{object} ({api_version})")),
    })
}

/// Parsed documents by the hash of their text: on a reload only the documents that changed are
/// parsed again (a 10k-Service file reparses one Service, not all of them).
#[derive(Default)]
pub struct ConfigCache {
    docs: HashMap<u64, Parsed, foldhash::fast::FixedState>,
    /// The last successful build, for incremental rebuilds.
    pub built: DesiredCache,
}

impl ConfigCache {
    /// Parses every YAML document of `text`; documents not seen before are parsed on all cores.
    pub fn parse(&mut self, text: &str) -> Result<Objects, ConfigErrors> {
        use std::hash::BuildHasher;
        // foldhash: several times faster than SipHash over a 6 MB file, and the key is ours.
        let hasher = foldhash::quality::FixedState::with_seed(0x6c62_2d63_6163_6865);
        let docs: Vec<(u64, &str)> = split_documents(text)
            .into_iter()
            .map(|t| (hasher.hash_one(t), t))
            .collect();
        let fresh: Vec<usize> = (0..docs.len())
            .filter(|&i| !self.docs.contains_key(&docs[i].0))
            .collect();
        let parse = |i: &usize| {
            (
                *i,
                parse_document(docs[*i].1, &format!("document {}", i + 1)),
            )
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut parsed_fresh: HashMap<usize, Result<Parsed, ConfigError>> =
            if fresh.len() < 64 || threads == 1 {
                fresh.iter().map(parse).collect()
            } else {
                std::thread::scope(|scope| {
                    let workers: Vec<_> = fresh
                        .chunks(fresh.len().div_ceil(threads))
                        .map(|part| scope.spawn(move || part.iter().map(parse).collect::<Vec<_>>()))
                        .collect();
                    workers
                        .into_iter()
                        .flat_map(|w| w.join().expect("parser thread panicked"))
                        .collect()
                })
            };
        let mut objects = Objects::default();
        let mut errors = Vec::new();
        // A `kind: List` (even an empty one) says what the file holds on purpose.
        let mut declared_empty = false;
        for (index, (key, _)) in docs.iter().enumerate() {
            // Cached documents stay where they are: no reference count is touched twice (on a
            // 20k-document file those cold cache lines are most of a reload).
            let parsed = match parsed_fresh.remove(&index) {
                Some(Ok(p)) => self.docs.entry(*key).or_insert(p),
                Some(Err(e)) => {
                    errors.push(e);
                    continue;
                }
                None => &self.docs[key],
            };
            declared_empty |= matches!(parsed, Parsed::List(_));
            objects.add(parsed, index);
        }
        if self.docs.len() > docs.len() {
            let keys: HashSet<u64> = docs.iter().map(|(k, _)| *k).collect();
            self.docs.retain(|k, _| keys.contains(k));
        }
        if errors.is_empty() {
            // The same object twice: which one would win is not the file's to leave open.
            errors.extend(objects.duplicates());
        }
        if errors.is_empty() && !declared_empty && objects.is_empty() {
            // An empty or cut-off file would delete every Service: refused.
            errors.push(err(
                "the file",
                "",
                "no objects (empty or truncated?): to run with no Services, write a `kind: List` with `items: []`",
            ));
        }
        if errors.is_empty() {
            Ok(objects)
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

impl Objects {
    fn add(&mut self, parsed: &Parsed, index: usize) {
        match parsed {
            Parsed::Null => {}
            Parsed::Service(s) => self.services.push(s.clone()),
            Parsed::Slice(s) => self.endpoint_slices.push(s.clone()),
            Parsed::Pool(kind, p) => self.pools.push((kind.clone(), p.clone())),
            Parsed::Policy(kind, p) => self.l2_policies.push((kind.clone(), p.clone())),
            Parsed::Ignored(what) => self.ignored.push(format!("document {}: {what}", index + 1)),
            Parsed::List(items) => {
                for item in items {
                    self.add(item, index);
                }
            }
        }
    }

    /// Objects given twice (same kind, namespace and name).
    fn duplicates(&self) -> Vec<ConfigError> {
        fn twice<'a>(
            kind: &str,
            names: impl Iterator<Item = (&'a Option<String>, Option<&'a Option<String>>)>,
        ) -> Vec<ConfigError> {
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            // (name, Some(namespace) for namespaced kinds)
            for (name, namespace) in names {
                let name = name.as_deref().unwrap_or("");
                let object = if let Some(namespace) = namespace {
                    let ns = namespace.as_deref().unwrap_or("default");
                    format!("{kind} {ns}/{name}")
                } else {
                    format!("{kind} {name}")
                };
                if !seen.insert(object.clone()) {
                    out.push(err(object, "metadata.name", "given twice in the file"));
                }
            }
            out
        }
        let mut out = twice(
            "Service",
            self.services
                .iter()
                .map(|s| (&s.metadata.name, Some(&s.metadata.namespace))),
        );
        out.extend(twice(
            "EndpointSlice",
            self.endpoint_slices
                .iter()
                .map(|s| (&s.metadata.name, Some(&s.metadata.namespace))),
        ));
        out.extend(twice(
            "LoadBalancerIPPool",
            self.pools.iter().map(|(_, p)| (&p.metadata.name, None)),
        ));
        out.extend(twice(
            "L2AnnouncementPolicy",
            self.l2_policies
                .iter()
                .map(|(_, p)| (&p.metadata.name, None)),
        ));
        out
    }

    /// No object at all, not even one of a kind we ignore.
    fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.endpoint_slices.is_empty()
            && self.pools.is_empty()
            && self.l2_policies.is_empty()
            && self.ignored.is_empty()
    }
}

/// Parses every YAML document of `text` (no cache).
pub fn parse_objects(text: &str) -> Result<Objects, ConfigErrors> {
    ConfigCache::default().parse(text)
}

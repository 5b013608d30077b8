//! A live source cannot reject the cluster: one bad Service must not stop every other change.
//! An object with errors is replaced by the version of it that last built, or left out if
//! there is none, and the rest is built. A file, which the user edits as a whole, stays
//! all-or-nothing ([`super::load_cached`]).

use super::*;

/// What a tolerant build made and what it had to set aside.
pub struct Tolerated {
    pub desired: Arc<DesiredState>,
    /// Each error of an object that was kept at its last good version or left out.
    pub set_aside: Vec<ConfigError>,
}

/// Builds `objects`, setting aside objects with errors (at most a few rounds: each round can
/// only shrink the set of new versions); `last_good` holds the objects of the last build that
/// had no error left and is updated.
pub fn build_tolerant(
    cache: &mut DesiredCache,
    objects: Objects,
    ctx: &BuildContext,
    last_good: &mut Arc<Objects>,
) -> Result<Tolerated, ConfigErrors> {
    let mut objects = objects;
    let mut set_aside = Vec::new();
    for _ in 0..4 {
        let candidate = Arc::new(objects);
        match cache.build(&candidate, ctx) {
            Ok(desired) => {
                *last_good = candidate;
                return Ok(Tolerated { desired, set_aside });
            }
            Err(errors) => {
                let bad: HashSet<String> = errors.0.iter().map(|e| e.object.clone()).collect();
                let Some(next) = substitute(&candidate, &bad, last_good) else {
                    return Err(errors);
                };
                set_aside.extend(errors.0);
                objects = next;
            }
        }
    }
    Err(ConfigErrors(set_aside))
}

/// `objects` with each object named in `bad` replaced by its version in `good` (when that is a
/// different version) or removed; None when no object is named (nothing to set aside).
fn substitute(objects: &Objects, bad: &HashSet<String>, good: &Objects) -> Option<Objects> {
    let mut touched = false;
    let service = |s: &Arc<Service>| format!("Service {}", namespaced(&s.metadata));
    let slice = |s: &Arc<slice::Slice>| {
        format!(
            "EndpointSlice {}/{}",
            s.metadata.namespace.as_deref().unwrap_or("default"),
            s.metadata.name.as_deref().unwrap_or("<unnamed>")
        )
    };
    let pool = |(kind, p): &(String, Arc<IpPool>)| cluster_scoped(kind, &p.metadata);
    let policy = |(kind, p): &(String, Arc<L2Policy>)| cluster_scoped(kind, &p.metadata);
    let next = Objects {
        services: set_aside(
            &objects.services,
            &good.services,
            bad,
            &mut touched,
            service,
            Arc::ptr_eq,
        ),
        endpoint_slices: set_aside(
            &objects.endpoint_slices,
            &good.endpoint_slices,
            bad,
            &mut touched,
            slice,
            Arc::ptr_eq,
        ),
        pools: set_aside(
            &objects.pools,
            &good.pools,
            bad,
            &mut touched,
            pool,
            |a, b| Arc::ptr_eq(&a.1, &b.1),
        ),
        l2_policies: set_aside(
            &objects.l2_policies,
            &good.l2_policies,
            bad,
            &mut touched,
            policy,
            |a, b| Arc::ptr_eq(&a.1, &b.1),
        ),
        ignored: objects.ignored.clone(),
    };
    touched.then_some(next)
}

/// One list of [`substitute`].
fn set_aside<E: Clone>(
    list: &[E],
    good: &[E],
    bad: &HashSet<String>,
    touched: &mut bool,
    name: impl Fn(&E) -> String,
    same: impl Fn(&E, &E) -> bool,
) -> Vec<E> {
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        let n = name(e);
        if !bad.contains(&n) {
            out.push(e.clone());
            continue;
        }
        *touched = true;
        out.extend(
            good.iter()
                .find(|g| name(g) == n)
                .filter(|g| !same(g, e))
                .cloned(),
        );
    }
    out
}

fn namespaced(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

fn cluster_scoped(kind: &str, meta: &ObjectMeta) -> String {
    format!("{kind} {}", meta.name.as_deref().unwrap_or("<unnamed>"))
}

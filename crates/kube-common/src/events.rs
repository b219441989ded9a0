//! Publishing Events (events.k8s.io/v1) with the fixes every component needs.
//!
//! The same event about the same object within six minutes becomes one Event whose `series`
//! counts it (keeping the first note), as kube's and client-go's recorders do; callers pass an
//! action that tells different situations apart. Unlike kube's `Recorder`, which keeps a copy of
//! every whole Event for those six minutes, the series cache here keeps a hash of the event's
//! identity, its name and its count, and is bounded: a controller reporting on a burst of
//! thousands of objects does not hold thousands of Events in memory.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex, PoisonError};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
pub use kube::runtime::events::{Event, EventType};

/// How long a repeat of an event joins the existing Event's series (client-go's and kube's).
const SERIES_TTL: SignedDuration = SignedDuration::from_mins(6);

/// At most this many series remembered; past it the oldest is forgotten (its next repeat then
/// starts a new Event, which is all forgetting costs).
const MAX_SERIES: usize = 4096;

/// What is remembered of a published Event to extend its series.
#[derive(Clone, Debug)]
struct Series {
    name: String,
    count: i32,
    last: Timestamp,
}

/// An Events writer reporting as one controller (instance: the pod, from `POD_NAME`).
#[derive(Clone)]
pub struct Recorder {
    client: Client,
    controller: String,
    instance: String,
    hasher: RandomState,
    series: Arc<Mutex<HashMap<u64, Series>>>,
}

impl Recorder {
    pub fn new(client: Client, controller: &str) -> Self {
        Self {
            client,
            controller: controller.to_string(),
            instance: std::env::var("POD_NAME").unwrap_or_else(|_| controller.to_string()),
            hasher: RandomState::new(),
            series: Arc::default(),
        }
    }

    /// Creates the Event, or extends the series of the same event published recently.
    pub async fn publish(
        &self,
        ev: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let key = self.key(ev, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        if let Some(s) = self.repeat_of(key, now) {
            let count = s.count + 1;
            let patch = serde_json::json!({"series": {
                "count": count, "lastObservedTime": MicroTime(now)}});
            match events
                .patch(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    let next = Series {
                        count,
                        last: now,
                        ..s
                    };
                    self.remember(key, next, now);
                    return Ok(());
                }
                // The Event is gone (expired by the apiserver, deleted): start a new one, as
                // client-go does.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
        let event = self.new_event(ev, regarding, now);
        let created = events.create(&PostParams::default(), &event).await?;
        let next = Series {
            name: created.metadata.name.unwrap_or_default(),
            count: 1,
            last: now,
        };
        self.remember(key, next, now);
        Ok(())
    }

    /// Identity of an event: kube's `EventKey` (type, action, reason, reporter, regarding and
    /// related object), hashed with this recorder's random keys so clients cannot aim collisions.
    fn key(&self, ev: &Event, regarding: &ObjectReference) -> u64 {
        let mut h = self.hasher.build_hasher();
        (ev.type_, &ev.action, &ev.reason).hash(&mut h);
        hash_ref(regarding, &mut h);
        if let Some(r) = &ev.secondary {
            hash_ref(r, &mut h);
        }
        h.finish()
    }

    fn repeat_of(&self, key: u64, now: Timestamp) -> Option<Series> {
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series
            .get(&key)
            .filter(|s| s.last + SERIES_TTL > now)
            .cloned()
    }

    fn remember(&self, key: u64, s: Series, now: Timestamp) {
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        if series.len() >= MAX_SERIES && !series.contains_key(&key) {
            series.retain(|_, v| v.last + SERIES_TTL > now);
            if series.len() >= MAX_SERIES
                && let Some(oldest) = series.iter().min_by_key(|(_, v)| v.last).map(|(k, _)| *k)
            {
                series.remove(&oldest);
            }
        }
        series.insert(key, s);
    }

    fn new_event(&self, ev: &Event, regarding: &ObjectReference, now: Timestamp) -> K8sEvent {
        let subject = regarding.name.as_deref().unwrap_or(&self.controller);
        K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{subject}.{:x}", now.as_nanosecond())),
                namespace: regarding.namespace.clone(),
                ..Default::default()
            },
            action: Some(ev.action.clone()),
            reason: Some(ev.reason.clone()),
            note: ev.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: ev.secondary.clone(),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(
                match ev.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..Default::default()
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

fn hash_ref(r: &ObjectReference, h: &mut impl Hasher) {
    (&r.api_version, &r.kind, &r.namespace, &r.name, &r.uid).hash(h);
}

/// Publishes an Event; a failure is logged, never returned (an Event is a report, not a step).
pub async fn publish(
    recorder: &Recorder,
    regarding: &ObjectReference,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    // Kubernetes ≤ 1.21 requires the regarding namespace to equal the Event's, and Events
    // about cluster-scoped objects (ClusterIssuers) live in "default".
    let mut regarding = regarding.clone();
    if regarding.namespace.as_deref().unwrap_or("").is_empty() {
        regarding.namespace = Some("default".into());
    }
    let regarding = &regarding;
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, regarding).await {
        tracing::warn!(reason, object = ?regarding.name, error = %e, "publishing an Event failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder() -> Recorder {
        // Never contacted: these tests exercise the series cache only.
        let cfg = kube::Config::new("http://127.0.0.1:9".parse().expect("uri"));
        let client = Client::try_from(cfg).expect("client");
        Recorder::new(client, "test")
    }

    fn reference(name: &str) -> ObjectReference {
        ObjectReference {
            kind: Some("ConfigMap".into()),
            namespace: Some("ns".into()),
            name: Some(name.into()),
            ..Default::default()
        }
    }

    fn event(reason: &str) -> Event {
        Event {
            type_: EventType::Normal,
            reason: reason.into(),
            note: None,
            action: "A".into(),
            secondary: None,
        }
    }

    #[tokio::test]
    async fn a_repeat_within_the_ttl_extends_the_series() {
        let r = recorder();
        let now = Timestamp::now();
        let k = r.key(&event("R"), &reference("a"));
        assert_ne!(k, r.key(&event("S"), &reference("a")));
        assert_ne!(k, r.key(&event("R"), &reference("b")));
        let s = Series {
            name: "a.1".into(),
            count: 1,
            last: now,
        };
        r.remember(k, s, now);
        assert_eq!(r.repeat_of(k, now).map(|s| s.name), Some("a.1".into()));
        assert!(r.repeat_of(k, now + SERIES_TTL).is_none(), "expired");
    }

    #[tokio::test]
    async fn the_cache_is_bounded() {
        let r = recorder();
        let start = Timestamp::now();
        for i in 0..(MAX_SERIES + 100) {
            let now = start + SignedDuration::from_millis(i as i64);
            let k = r.key(&event("R"), &reference(&format!("o{i}")));
            let s = Series {
                name: format!("o{i}.1"),
                count: 1,
                last: now,
            };
            r.remember(k, s, now);
        }
        assert_eq!(r.remembered(), MAX_SERIES);
        let first = r.key(&event("R"), &reference("o0"));
        assert!(r.repeat_of(first, start).is_none(), "oldest forgotten");
    }
}

//! Publishing Events (events.k8s.io/v1) with the fixes every component needs.
//!
//! kube's Recorder folds events with the same reason and action into one series (keeping the
//! first note), so callers pass an action that tells different situations apart.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};

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

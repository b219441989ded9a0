//! `--publish-service`: the leader writes the Service's address into `status.loadBalancer` of
//! every Ingress it serves (as ingress-nginx does), and clears it from Ingresses it no longer
//! serves. Every replica serves traffic; only the leader writes status.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::proxy::Proxy;
use crate::snapshot::{ObjectKey, key_of};

/// How often status is re-checked even without a change (someone may have edited it).
const RESYNC: Duration = Duration::from_secs(60);

/// The addresses to publish: the Service's load-balancer entries, else its external IPs,
/// else its cluster IP.
pub fn addresses(service: &Service) -> Vec<Value> {
    let lb: Vec<Value> = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| match (&i.ip, &i.hostname) {
            (Some(ip), _) => Some(json!({"ip": ip})),
            (None, Some(h)) => Some(json!({"hostname": h})),
            _ => None,
        })
        .collect();
    if !lb.is_empty() {
        return lb;
    }
    let spec = service.spec.as_ref();
    let external: Vec<Value> = spec
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .map(|ip| json!({"ip": ip}))
        .collect();
    if !external.is_empty() {
        return external;
    }
    spec.and_then(|s| s.cluster_ip.as_ref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
        .map(|ip| vec![json!({"ip": ip})])
        .unwrap_or_default()
}

fn current(ingress: &Ingress) -> Value {
    ingress
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .map(|v| serde_json::to_value(v).unwrap_or(Value::Null))
        .unwrap_or_else(|| json!([]))
}

/// Runs while `leading` is not cancelled; rechecks on every new snapshot generation.
pub async fn publish_loop(
    client: Client,
    publish: ObjectKey,
    ingresses: Store<Ingress>,
    services: Store<Service>,
    proxy: Arc<Proxy>,
    mut generations: watch::Receiver<u64>,
    leading: CancellationToken,
) {
    loop {
        let Some(service) = services.get(&ObjectRef::new(&publish.name).within(&publish.namespace))
        else {
            tracing::warn!(service = %publish, "--publish-service not found; Ingress status not updated");
            if wait(&mut generations, &leading).await {
                continue;
            }
            return;
        };
        let want = Value::Array(addresses(&service));
        let served: std::collections::HashSet<ObjectKey> = proxy
            .snapshot()
            .ingresses
            .iter()
            .map(|i| key_of(i.as_ref()))
            .collect();
        for ing in ingresses.state() {
            let key = key_of(ing.as_ref());
            let ours = served.contains(&key);
            let has = current(&ing);
            let target = if ours { want.clone() } else { json!([]) };
            // Leave alone Ingresses we never touched and do not serve.
            if has == target || (!ours && has == json!([])) {
                continue;
            }
            if !ours && has != want {
                continue; // someone else's address: another controller owns it
            }
            let patch = json!({"status": {"loadBalancer": {"ingress": target}}});
            let api: Api<Ingress> = Api::namespaced(client.clone(), &key.namespace);
            if let Err(e) = api
                .patch_status(&key.name, &PatchParams::default(), &Patch::Merge(patch))
                .await
            {
                tracing::warn!(ingress = %key, error = %e, "updating Ingress status failed");
            }
        }
        if !wait(&mut generations, &leading).await {
            return;
        }
    }
}

/// Waits for a new generation or the resync period; false once leadership ended.
async fn wait(generations: &mut watch::Receiver<u64>, leading: &CancellationToken) -> bool {
    tokio::select! {
        _ = leading.cancelled() => false,
        r = generations.changed() => r.is_ok(),
        _ = tokio::time::sleep(RESYNC) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(v: Value) -> Service {
        serde_json::from_value(v).expect("service")
    }

    #[test]
    fn address_preference() {
        let lb = svc(
            json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.0.0.1", "externalIPs": ["1.2.3.4"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "5.6.7.8"}, {"hostname": "lb.example"}]}}}),
        );
        assert_eq!(
            addresses(&lb),
            vec![json!({"ip": "5.6.7.8"}), json!({"hostname": "lb.example"})]
        );
        let ext = svc(
            json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.0.0.1", "externalIPs": ["1.2.3.4"]}}),
        );
        assert_eq!(addresses(&ext), vec![json!({"ip": "1.2.3.4"})]);
        let cip = svc(json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "10.0.0.1"}}));
        assert_eq!(addresses(&cip), vec![json!({"ip": "10.0.0.1"})]);
        let headless = svc(json!({"metadata": {"name": "s"}, "spec": {"clusterIP": "None"}}));
        assert!(addresses(&headless).is_empty());
    }
}

//! API versions that differ between the servers we run against.

use kube::Client;
use kube::api::{ApiResource, GroupVersionKind};

/// EndpointSlices as `discovery.k8s.io/v1` where served, else `v1beta1` (Kubernetes ≤ 1.20).
pub async fn endpoint_slice_resource(client: &Client) -> Result<ApiResource, kube::Error> {
    for version in ["v1", "v1beta1"] {
        let gv = format!("discovery.k8s.io/{version}");
        match client.list_api_group_resources(&gv).await {
            Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => {
                tracing::info!(api = %gv, "using EndpointSlices");
                return Ok(slice_resource(version));
            }
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    // Neither served: keep v1 so callers report the missing API clearly.
    Ok(slice_resource("v1"))
}

fn slice_resource(version: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("discovery.k8s.io", version, "EndpointSlice"),
        "endpointslices",
    )
}

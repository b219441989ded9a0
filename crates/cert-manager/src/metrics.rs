//! Metrics with cert-manager's names and labels (namespace `certmanager`), so existing
//! dashboards and alerts keep working.

use kube_common::metrics::BareCounter;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::api::{Certificate, CertificateStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub name: String,
    pub namespace: String,
    pub condition: String,
    pub issuer_name: String,
    pub issuer_kind: String,
    pub issuer_group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertLabels {
    pub name: String,
    pub namespace: String,
    pub issuer_name: String,
    pub issuer_kind: String,
    pub issuer_group: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcmeLabels {
    pub scheme: String,
    pub host: String,
    pub action: String,
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub certificate_ready_status: Family<ReadyLabels, Gauge>,
    pub certificate_expiration_timestamp_seconds: Family<CertLabels, Gauge>,
    pub certificate_not_after_timestamp_seconds: Family<CertLabels, Gauge>,
    pub certificate_not_before_timestamp_seconds: Family<CertLabels, Gauge>,
    pub certificate_renewal_timestamp_seconds: Family<CertLabels, Gauge>,
    pub acme_client_request_count: Family<AcmeLabels, BareCounter>,
    pub acme_client_request_duration_seconds: Family<AcmeLabels, Histogram>,
    pub controller_sync_call_count: Family<ControllerLabels, BareCounter>,
    pub controller_sync_error_count: Family<ControllerLabels, BareCounter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            certificate_ready_status: Family::default(),
            certificate_expiration_timestamp_seconds: Family::default(),
            certificate_not_after_timestamp_seconds: Family::default(),
            certificate_not_before_timestamp_seconds: Family::default(),
            certificate_renewal_timestamp_seconds: Family::default(),
            acme_client_request_count: Family::default(),
            acme_client_request_duration_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.005, 2.0, 14))
            }),
            controller_sync_call_count: Family::default(),
            controller_sync_error_count: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("certmanager");
        r.register(
            "certificate_ready_status",
            "The ready status of the certificate.",
            m.certificate_ready_status.clone(),
        );
        r.register(
            "certificate_expiration_timestamp_seconds",
            "The timestamp after which the certificate expires, expressed in Unix Epoch Time.",
            m.certificate_expiration_timestamp_seconds.clone(),
        );
        r.register(
            "certificate_not_after_timestamp_seconds",
            "The timestamp after which the certificate is invalid, expressed as a Unix Epoch Time.",
            m.certificate_not_after_timestamp_seconds.clone(),
        );
        r.register(
            "certificate_not_before_timestamp_seconds",
            "The timestamp before which the certificate is invalid, expressed as a Unix Epoch Time.",
            m.certificate_not_before_timestamp_seconds.clone(),
        );
        r.register(
            "certificate_renewal_timestamp_seconds",
            "The number of seconds before expiration time the certificate should renew.",
            m.certificate_renewal_timestamp_seconds.clone(),
        );
        r.register(
            "http_acme_client_request_count",
            "The number of requests made by the ACME client.",
            m.acme_client_request_count.clone(),
        );
        r.register(
            "http_acme_client_request_duration_seconds",
            "The HTTP request latencies in seconds for the ACME client.",
            m.acme_client_request_duration_seconds.clone(),
        );
        r.register(
            "controller_sync_call_count",
            "The number of sync() calls made by a controller.",
            m.controller_sync_call_count.clone(),
        );
        r.register(
            "controller_sync_error_count",
            "The number of errors encountered during controller sync().",
            m.controller_sync_error_count.clone(),
        );
        m
    }

    pub fn sync_call(&self, controller: &str) {
        self.controller_sync_call_count
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
    }

    pub fn sync_error(&self, controller: &str) {
        self.controller_sync_error_count
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
    }

    /// Sets the per-Certificate series from its status (one series per condition value, as
    /// upstream: the current one 1, the others 0).
    pub fn observe_certificate(&self, cert: &Certificate, status: &CertificateStatus) {
        let (labels, ready_labels) = certificate_labels(cert);
        let ready = status
            .conditions
            .as_deref()
            .and_then(|c| crate::api::condition(c, "Ready"))
            .map(|c| c.status.clone())
            .unwrap_or_else(|| "Unknown".into());
        for (value, l) in ready_labels {
            self.certificate_ready_status
                .get_or_create(&l)
                .set(i64::from(value == ready));
        }
        let ts = |t: &Option<String>| t.as_deref().and_then(crate::time::parse_secs).unwrap_or(0);
        for (family, value) in [
            (
                &self.certificate_expiration_timestamp_seconds,
                ts(&status.not_after),
            ),
            (
                &self.certificate_not_after_timestamp_seconds,
                ts(&status.not_after),
            ),
            (
                &self.certificate_not_before_timestamp_seconds,
                ts(&status.not_before),
            ),
            (
                &self.certificate_renewal_timestamp_seconds,
                ts(&status.renewal_time),
            ),
        ] {
            family.get_or_create(&labels).set(value);
        }
    }

    /// Drops a deleted Certificate's series.
    pub fn forget_certificate(&self, cert: &Certificate) {
        let (labels, ready_labels) = certificate_labels(cert);
        for family in [
            &self.certificate_expiration_timestamp_seconds,
            &self.certificate_not_after_timestamp_seconds,
            &self.certificate_not_before_timestamp_seconds,
            &self.certificate_renewal_timestamp_seconds,
        ] {
            family.remove(&labels);
        }
        for (_, l) in ready_labels {
            self.certificate_ready_status.remove(&l);
        }
    }
}

/// A Certificate's labels, and its ready-status labels per condition value.
fn certificate_labels(cert: &Certificate) -> (CertLabels, [(&'static str, ReadyLabels); 3]) {
    let name = kube::ResourceExt::name_any(cert);
    let namespace = kube::ResourceExt::namespace(cert).unwrap_or_default();
    let issuer = &cert.spec.issuer_ref;
    let ready = |condition: &'static str| {
        (
            condition,
            ReadyLabels {
                name: name.clone(),
                namespace: namespace.clone(),
                condition: condition.into(),
                issuer_name: issuer.name.clone(),
                issuer_kind: issuer.kind().into(),
                issuer_group: issuer.group().into(),
            },
        )
    };
    let ready_labels = [ready("True"), ready("False"), ready("Unknown")];
    let labels = CertLabels {
        name,
        namespace,
        issuer_name: issuer.name.clone(),
        issuer_kind: issuer.kind().into(),
        issuer_group: issuer.group().into(),
    };
    (labels, ready_labels)
}

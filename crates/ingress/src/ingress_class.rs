//! Which Ingresses are ours, exactly as ingress-nginx decides (`GetIngressClass`):
//! 1. `spec.ingressClassName` names an IngressClass whose `spec.controller` is
//!    `--controller-class`;
//! 2. else the `kubernetes.io/ingress.class` annotation equals `--ingress-class`;
//! 3. else only with `--watch-ingress-without-class`.

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

pub const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";
pub const DEFAULT_CONTROLLER: &str = "k8s.io/ingress-nginx";
pub const DEFAULT_CLASS: &str = "nginx";

/// The class flags.
#[derive(Clone, Debug)]
pub struct ClassSelector {
    pub controller_class: String,
    pub ingress_class: String,
    pub watch_without_class: bool,
}

impl Default for ClassSelector {
    fn default() -> Self {
        Self {
            controller_class: DEFAULT_CONTROLLER.into(),
            ingress_class: DEFAULT_CLASS.into(),
            watch_without_class: false,
        }
    }
}

impl ClassSelector {
    /// Whether `ingress` belongs to this controller, given the cluster's IngressClasses.
    pub fn accepts<'a>(
        &self,
        ingress: &Ingress,
        classes: impl IntoIterator<Item = &'a IngressClass>,
    ) -> bool {
        let class_name = ingress
            .spec
            .as_ref()
            .and_then(|s| s.ingress_class_name.as_deref());
        if let Some(name) = class_name {
            return classes.into_iter().any(|c| {
                c.metadata.name.as_deref() == Some(name)
                    && c.spec.as_ref().and_then(|s| s.controller.as_deref())
                        == Some(self.controller_class.as_str())
            });
        }
        if let Some(annotation) = ingress
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(CLASS_ANNOTATION))
        {
            return *annotation == self.ingress_class;
        }
        self.watch_without_class
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{IngressClassSpec, IngressSpec};
    use kube::api::ObjectMeta;

    fn class(name: &str, controller: &str) -> IngressClass {
        IngressClass {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(IngressClassSpec {
                controller: Some(controller.into()),
                ..Default::default()
            }),
        }
    }

    fn ingress(class_name: Option<&str>, annotation: Option<&str>) -> Ingress {
        Ingress {
            metadata: ObjectMeta {
                name: Some("i".into()),
                annotations: annotation
                    .map(|a| [(CLASS_ANNOTATION.to_string(), a.to_string())].into()),
                ..Default::default()
            },
            spec: Some(IngressSpec {
                ingress_class_name: class_name.map(str::to_string),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// features/ingress_class.feature plus ingress-nginx's annotation fallback.
    #[test]
    fn selection_order() {
        let classes = [
            class("nginx", DEFAULT_CONTROLLER),
            class("other", "example.com/other"),
        ];
        let sel = ClassSelector::default();
        assert!(sel.accepts(&ingress(Some("nginx"), None), &classes));
        assert!(!sel.accepts(&ingress(Some("other"), None), &classes));
        assert!(!sel.accepts(&ingress(Some("missing"), None), &classes));
        // ingressClassName decides even when the annotation says otherwise.
        assert!(!sel.accepts(&ingress(Some("other"), Some("nginx")), &classes));
        assert!(sel.accepts(&ingress(None, Some("nginx")), &classes));
        assert!(!sel.accepts(&ingress(None, Some("traefik")), &classes));
        assert!(!sel.accepts(&ingress(None, None), &classes));
        let open = ClassSelector {
            watch_without_class: true,
            ..ClassSelector::default()
        };
        assert!(open.accepts(&ingress(None, None), &classes));
        assert!(!open.accepts(&ingress(None, Some("traefik")), &classes));
    }
}

//! Configuration phase: the controller's ConfigMap, all or nothing.

use k8s_openapi::api::core::v1::ConfigMap;

use super::{Builder, Problem};
use crate::config::Config;

impl Builder {
    /// Takes the ConfigMap's settings when every key parses (unknown keys are warned about
    /// once); otherwise keeps the last good configuration. Returns whether the ConfigMap in the
    /// cluster is the one in effect.
    pub(super) fn configuration(
        &mut self,
        configmap: Option<&ConfigMap>,
        problems: &mut Vec<Problem>,
    ) -> bool {
        let Some(cm) = configmap else {
            return true;
        };
        match Config::parse(cm.data.as_ref()) {
            Ok(parsed) => {
                self.last_good_config = parsed.config;
                for key in parsed.unknown {
                    self.report(
                        problems,
                        cm,
                        "UnknownConfigKey",
                        format!("ConfigMap key {key:?} is not supported and is ignored"),
                    );
                }
                true
            }
            Err(errs) => {
                let msg = errs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ");
                self.report(
                    problems,
                    cm,
                    "InvalidConfiguration",
                    format!("ConfigMap rejected, keeping the last good configuration: {msg}"),
                );
                false
            }
        }
    }
}

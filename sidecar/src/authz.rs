//! Who may call this service: an allow-list of caller identities.

use minimesh_spiffe::SpiffeId;

/// Allowed callers: short names (`order`, resolved in this proxy's trust
/// domain and namespace) or full SPIFFE URIs.
#[derive(Debug, Clone, Default)]
pub struct AllowList {
    ids: Vec<SpiffeId>,
}

impl AllowList {
    /// The list from short names (`order`, completed with the trust domain and
    ///  namespace) or full SPIFFE URIs.
    pub fn new(
        entries: &[String],
        trust_domain: &str,
        namespace: &str,
    ) -> Result<Self, minimesh_spiffe::SpiffeError> {
        let ids = entries
            .iter()
            .map(|entry| {
                if entry.starts_with("spiffe://") {
                    entry.parse()
                } else {
                    SpiffeId::new(trust_domain, namespace, entry)
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { ids })
    }

    /// Whether `caller` is on the list.
    pub fn allows(&self, caller: &SpiffeId) -> bool {
        self.ids.iter().any(|id| id == caller)
    }

    /// The identities on the list, for the config dump.
    pub fn entries(&self) -> &[SpiffeId] {
        &self.ids
    }
}

/// The refusal message: it names the caller, so the operator sees whom to allow.
pub fn denial(caller: &SpiffeId, service: &str) -> String {
    format!("caller {caller} is not allowed to call the {service} service")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_resolve_in_our_domain_and_namespace() {
        let list = AllowList::new(
            &["order".into(), "gateway".into()],
            "minimesh.local",
            "default",
        )
        .unwrap();
        assert!(
            list.allows(
                &"spiffe://minimesh.local/ns/default/sa/order"
                    .parse()
                    .unwrap()
            )
        );
        assert!(
            list.allows(
                &"spiffe://minimesh.local/ns/default/sa/gateway"
                    .parse()
                    .unwrap()
            )
        );
        assert!(
            !list.allows(
                &"spiffe://minimesh.local/ns/default/sa/stranger"
                    .parse()
                    .unwrap()
            )
        );
        assert!(
            !list.allows(&"spiffe://minimesh.local/ns/other/sa/order".parse().unwrap()),
            "namespace matters"
        );
        assert!(
            !list.allows(&"spiffe://evil.example/ns/default/sa/order".parse().unwrap()),
            "trust domain matters"
        );
    }

    #[test]
    fn full_uris_and_bad_entries() {
        let list = AllowList::new(
            &["spiffe://partner.example/ns/x/sa/billing".into()],
            "minimesh.local",
            "default",
        )
        .unwrap();
        assert!(list.allows(&"spiffe://partner.example/ns/x/sa/billing".parse().unwrap()));
        assert!(AllowList::new(&["Not A Name".into()], "minimesh.local", "default").is_err());
        let msg = denial(
            &"spiffe://minimesh.local/ns/default/sa/stranger"
                .parse()
                .unwrap(),
            "payment",
        );
        assert!(msg.contains("spiffe://minimesh.local/ns/default/sa/stranger"));
    }
}

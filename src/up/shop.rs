//! The shop's services, read from the one list the chart and the tests
//! read too (`helm/minimesh/shop.yaml`), embedded at build time.

use serde::Deserialize;
use std::sync::LazyLock;

const SHOP_YAML: &str = include_str!("../../helm/minimesh/shop.yaml");

/// Identities that may call a service without being one (the edge proxy).
const OTHER_CALLERS: [&str; 1] = ["gateway"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShopFile {
    services: Vec<Service>,
}

/// One service of the shop, as the list describes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Service {
    pub(super) name: String,
    /// gRPC package prefix the proxies route to this service.
    pub(super) route: String,
    /// Services it calls through its sidecar.
    pub(super) upstreams: Vec<String>,
    /// Caller identities its sidecar admits.
    pub(super) allow: Vec<String>,
}

/// The shop's services in start order: every service after its upstreams.
#[derive(Debug)]
pub(super) struct Shop {
    pub(super) services: Vec<Service>,
}

impl Shop {
    pub(super) fn names(&self) -> impl Iterator<Item = &str> {
        self.services.iter().map(|s| s.name.as_str())
    }

    pub(super) fn get(&self, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.name == name)
    }
}

static SHOP: LazyLock<Result<Shop, String>> = LazyLock::new(|| parse(SHOP_YAML));

/// The embedded list, checked (a unit test makes sure it parses).
pub(super) fn shop() -> anyhow::Result<&'static Shop> {
    SHOP.as_ref()
        .map_err(|err| anyhow::anyhow!("the embedded shop.yaml: {err}"))
}

fn parse(text: &str) -> Result<Shop, String> {
    let file: ShopFile = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
    let known = |name: &str| file.services.iter().any(|s| s.name == name);
    for (i, service) in file.services.iter().enumerate() {
        let name = &service.name;
        // The name becomes a flag (--NAME-addr), a file name and a DNS label.
        let label = !name.is_empty()
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !label || OTHER_CALLERS.contains(&name.as_str()) {
            return Err(format!("{name:?} cannot name a service"));
        }
        if file.services[..i].iter().any(|s| &s.name == name) {
            return Err(format!("service {name} is listed twice"));
        }
        if service.route.is_empty() {
            return Err(format!("service {name} has an empty route"));
        }
        if let Some(bad) = service.upstreams.iter().find(|u| !known(u) || *u == name) {
            return Err(format!(
                "service {name} calls {bad}, which is not another service"
            ));
        }
        if let Some(bad) = service
            .allow
            .iter()
            .find(|a| !known(a) && !OTHER_CALLERS.contains(&a.as_str()))
        {
            return Err(format!(
                "service {name} allows {bad}, which is no identity of the mesh"
            ));
        }
    }
    // Start order: repeatedly the first listed service whose upstreams have all started.
    let mut pending = file.services;
    let mut services: Vec<Service> = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let ready = pending.iter().position(|s| {
            s.upstreams
                .iter()
                .all(|u| services.iter().any(|started| &started.name == u))
        });
        let Some(ready) = ready else {
            let names: Vec<_> = pending.iter().map(|s| s.name.as_str()).collect();
            return Err(format!("services {names:?} call each other in a cycle"));
        };
        services.push(pending.remove(ready));
    }
    Ok(Shop { services })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_list_parses_and_starts_upstreams_first() {
        let shop = shop().unwrap();
        assert_eq!(
            shop.names().collect::<Vec<_>>(),
            ["user", "payment", "order"]
        );
        let order = shop.get("order").unwrap();
        assert_eq!(order.upstreams, ["user", "payment"]);
        assert_eq!(order.route, "shop.order.");
        // CONTRACT §3's default policy.
        let allow = |name: &str| shop.get(name).unwrap().allow.join(",");
        assert_eq!(
            (allow("user"), allow("order"), allow("payment")),
            (s("order,gateway"), s("gateway"), s("order"))
        );
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn bad_lists_are_refused() {
        let one = |name: &str, upstreams: &str, allow: &str| {
            format!(
                "  - {{name: {name}, route: shop.{name}., upstreams: [{upstreams}], allow: [{allow}]}}\n"
            )
        };
        let list = |entries: &[String]| format!("services:\n{}", entries.concat());
        for (bad, why) in [
            (list(&[one("a", "b", ""), one("b", "a", "")]), "cycle"),
            (list(&[one("a", "", ""), one("a", "", "")]), "twice"),
            (list(&[one("a", "nope", "")]), "not another service"),
            (list(&[one("a", "a", "")]), "not another service"),
            (list(&[one("a", "", "stranger")]), "no identity"),
            (list(&[one("gateway", "", "")]), "cannot name"),
            (list(&[one("Bad_Name", "", "")]), "cannot name"),
            (
                s("services: [{name: a, route: x., upstreams: [], allow: [], extra: 1}]"),
                "unknown field",
            ),
        ] {
            let err = parse(&bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let fine = parse(&list(&[
            one("c", "b", "gateway"),
            one("a", "", "c"),
            one("b", "a", ""),
        ]))
        .unwrap();
        assert_eq!(fine.names().collect::<Vec<_>>(), ["a", "b", "c"]);
    }
}

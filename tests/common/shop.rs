//! The shop's services as `helm/minimesh/shop.yaml` lists them: the list
//! `up` and the chart read, so tests that cover every service follow it.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub(crate) struct Service {
    pub name: String,
    pub route: String,
    pub upstreams: Vec<String>,
    pub allow: Vec<String>,
}

#[derive(Deserialize)]
struct ShopFile {
    services: Vec<Service>,
}

/// Every service, in listed order.
pub(crate) fn services() -> Vec<Service> {
    let text = include_str!("../../helm/minimesh/shop.yaml");
    serde_yaml_ng::from_str::<ShopFile>(text)
        .expect("helm/minimesh/shop.yaml parses")
        .services
}

/// Every service's name, in listed order.
pub(crate) fn names() -> Vec<String> {
    services().into_iter().map(|s| s.name).collect()
}

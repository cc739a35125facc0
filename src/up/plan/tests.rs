//! Tests of the parent module, kept apart so the module reads as one job.
use super::*;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    up: UpArgs,
}

/// The flag values following each `flag` in a child's arguments.
fn values<'a>(child: &'a Child, flag: &str) -> Vec<&'a str> {
    let args = &child.args;
    args.iter()
        .zip(args.iter().skip(1))
        .filter(|(f, _)| *f == flag)
        .map(|(_, v)| v.as_str())
        .collect()
}

#[test]
fn command_lines_follow_the_shop_list() {
    let args = Cli::parse_from(["up", "--replicas", "payment=2"]).up;
    let gateway = bind_gateway("127.0.0.1:0".parse().unwrap()).unwrap();
    let dir = Path::new("/nonexistent");
    let plan = plan(&args, dir, dir, dir, gateway, &BootstrapKey::generate()).unwrap();
    validate(&plan.children).unwrap();
    let of = |name: &str| plan.children.iter().find(|c| c.name == name).unwrap();
    // Upstreams start first.
    let order: Vec<_> = plan.instances.iter().map(|i| i.service).collect();
    assert_eq!(order, ["user", "payment", "payment", "order"]);
    let payment_inbounds = plan
        .instances
        .iter()
        .filter(|i| i.service == "payment")
        .map(|i| i.inbound.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let sidecar = of("order-0-sidecar");
    assert_eq!(values(sidecar, "--allow"), ["gateway"]);
    assert_eq!(
        values(sidecar, "--route"),
        ["shop.user.=user", "shop.payment.=payment"]
    );
    assert_eq!(
        values(sidecar, "--upstream")[1],
        format!("payment={payment_inbounds}")
    );
    let outbound = format!("http://{}", plan.instances[3].outbound);
    assert_eq!(values(of("order-0"), "--user-addr"), [outbound.as_str()]);
    assert_eq!(values(of("order-0"), "--payment-addr"), [outbound.as_str()]);
    assert_eq!(values(of("user-0-sidecar"), "--allow"), ["order,gateway"]);
    assert_eq!(values(of("payment-1-sidecar"), "--allow"), ["order"]);
    assert!(values(of("payment-1-sidecar"), "--upstream").is_empty());
    assert!(values(of("user-0"), "--user-addr").is_empty());
    assert_eq!(
        values(of("gateway"), "--route"),
        [
            "shop.user.=user",
            "shop.payment.=payment",
            "shop.order.=order"
        ]
    );
}

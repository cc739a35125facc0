//! Which upstream a call goes to, from its gRPC path alone.

/// `/shop.payment.v1.PaymentService/Charge` goes to `payment`. Reflection and
/// health, which every service serves, go to `default` when there is one
/// (the gateway uses this so `grpcurl list` works through it).
pub fn upstream_for<'a>(path: &'a str, default: Option<&'a str>) -> Option<&'a str> {
    let rest = path.strip_prefix('/')?;
    let (service, _method) = rest.split_once('/')?;
    if let Some(shop) = service.strip_prefix("shop.") {
        let (name, rest) = shop.split_once('.')?;
        // Only versioned packages: shop.<name>.v<N>.<Service>
        let version = rest.split('.').next()?;
        let numbered = version
            .strip_prefix('v')
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        return (numbered && !name.is_empty()).then_some(name);
    }
    if service.starts_with("grpc.reflection.") || service == "grpc.health.v1.Health" {
        return default;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_package() {
        assert_eq!(
            upstream_for("/shop.payment.v1.PaymentService/Charge", None),
            Some("payment")
        );
        assert_eq!(
            upstream_for("/shop.order.v1.OrderService/WatchOrder", Some("user")),
            Some("order")
        );
        assert_eq!(
            upstream_for("/shop.user.v12.UserService/GetUser", None),
            Some("user")
        );
    }

    #[test]
    fn reflection_and_health_go_to_the_default() {
        for path in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "/grpc.health.v1.Health/Check",
        ] {
            assert_eq!(upstream_for(path, Some("user")), Some("user"), "{path}");
            assert_eq!(upstream_for(path, None), None, "{path}");
        }
    }

    #[test]
    fn anything_else_has_no_route() {
        for path in [
            "/",
            "",
            "/shop.payment.PaymentService/Charge",
            "/other.v1.Svc/M",
            "/shop..v1.X/Y",
            "/shop.payment.vx.P/C",
            "/nomethod",
        ] {
            assert_eq!(upstream_for(path, Some("user")), None, "{path:?}");
        }
    }
}

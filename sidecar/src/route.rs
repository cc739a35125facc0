//! Which upstream a call goes to, knowing no application's protos: the
//! `:authority` names an upstream (`payment`, `payment:80`,
//! `payment.shop.svc.cluster.local:8080`), or else the longest configured
//! prefix of the gRPC path does (`--route shop.payment.=payment`).

/// How a call found its upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// By the `:authority` host's first label.
    Authority,
    /// By the longest configured path prefix.
    Route,
    /// Health and reflection at the gateway, which every service serves.
    Default,
}

/// The routes table: gRPC path prefixes (without the leading `/`) to upstreams.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    /// Longest prefix first, so the first match is the longest.
    by_prefix: Vec<(String, String)>,
}

impl Routes {
    /// The table from `(prefix, upstream)` pairs; a leading `/` is ignored.
    pub fn new(routes: impl IntoIterator<Item = (String, String)>) -> Self {
        let mut by_prefix: Vec<(String, String)> = routes
            .into_iter()
            .map(|(prefix, upstream)| (prefix.trim_start_matches('/').to_owned(), upstream))
            .collect();
        by_prefix.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        by_prefix.dedup_by(|a, b| a.0 == b.0);
        Self { by_prefix }
    }

    /// The routes, longest prefix first.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_prefix.iter().map(|(p, u)| (p.as_str(), u.as_str()))
    }

    /// The upstream for a call, if any: by authority when it names a
    /// configured upstream (`is_upstream`), else by the longest matching
    /// route, else health and reflection to `default`.
    pub fn resolve<'a>(
        &'a self,
        authority: Option<&'a str>,
        path: &'a str,
        is_upstream: impl Fn(&str) -> bool,
        default: Option<&'a str>,
    ) -> Option<(&'a str, Via)> {
        if let Some(name) = authority.and_then(first_label)
            && is_upstream(name)
        {
            return Some((name, Via::Authority));
        }
        let rpc = path.strip_prefix('/')?;
        if let Some((_, upstream)) = self
            .by_prefix
            .iter()
            .find(|(prefix, _)| covers(prefix, rpc))
        {
            return Some((upstream.as_str(), Via::Route));
        }
        let service = rpc.split_once('/')?.0;
        if service.starts_with("grpc.reflection.") || service == "grpc.health.v1.Health" {
            return default.map(|name| (name, Via::Default));
        }
        None
    }
}

/// Whether route `prefix` covers the call `rpc` (`package.Service/Method`):
/// it must end on a name boundary, so `acme.echo` takes `acme.echo.v1.Echo/Say`
/// but not `acme.echoes.v1.Echo/Say`; a prefix ending in `.` or `/` is one.
fn covers(prefix: &str, rpc: &str) -> bool {
    let Some(rest) = rpc.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with(['.', '/']) || rest.is_empty() || rest.starts_with(['.', '/'])
}

/// `payment.shop.svc.cluster.local:8080` → `payment`; an IP address names
/// no upstream.
fn first_label(authority: &str) -> Option<&str> {
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host.starts_with('[') {
        return None;
    }
    let host = host.split(':').next()?;
    let label = host.split('.').next()?;
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    (!label.is_empty() && !is_ip).then_some(label)
}

/// Parses `PREFIX=UPSTREAM` (a `--route` flag).
pub fn parse_route(spec: &str) -> Result<(String, String), String> {
    let (prefix, upstream) = spec
        .split_once('=')
        .ok_or_else(|| format!("route {spec:?} is not PREFIX=UPSTREAM"))?;
    let prefix = prefix.trim().trim_start_matches('/');
    let upstream = upstream.trim();
    if prefix.is_empty() || upstream.is_empty() {
        return Err(format!("route {spec:?} is not PREFIX=UPSTREAM"));
    }
    Ok((prefix.to_owned(), upstream.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shop() -> Routes {
        Routes::new([
            ("shop.payment.".to_owned(), "payment".to_owned()),
            ("shop.".to_owned(), "catchall".to_owned()),
            ("/shop.user.v1.UserService/".to_owned(), "user".to_owned()),
        ])
    }

    const UPSTREAMS: [&str; 4] = ["payment", "user", "order", "catchall"];

    fn known(name: &str) -> bool {
        UPSTREAMS.contains(&name)
    }

    #[test]
    fn the_authority_names_the_upstream_in_any_form() {
        let routes = shop();
        for authority in [
            "payment",
            "payment:80",
            "payment.shop.svc.cluster.local:8080",
            "payment.shop.svc.cluster.local.",
        ] {
            assert_eq!(
                routes.resolve(Some(authority), "/any.Thing/Do", known, None),
                Some(("payment", Via::Authority)),
                "{authority}"
            );
        }
    }

    #[test]
    fn an_authority_naming_no_upstream_falls_back_to_the_longest_route() {
        let routes = shop();
        for authority in [
            None,
            Some("127.0.0.1:4140"),
            Some("localhost:4140"),
            Some("[::1]:4140"),
        ] {
            assert_eq!(
                routes.resolve(
                    authority,
                    "/shop.payment.v1.PaymentService/Charge",
                    known,
                    None
                ),
                Some(("payment", Via::Route))
            );
            assert_eq!(
                routes.resolve(authority, "/shop.user.v1.UserService/GetUser", known, None),
                Some(("user", Via::Route))
            );
            assert_eq!(
                routes.resolve(
                    authority,
                    "/shop.order.v1.OrderService/GetOrder",
                    known,
                    None
                ),
                Some(("catchall", Via::Route))
            );
        }
    }

    #[test]
    fn health_and_reflection_go_to_the_default_only() {
        let routes = Routes::default();
        for path in [
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            "/grpc.health.v1.Health/Check",
        ] {
            assert_eq!(
                routes.resolve(None, path, known, Some("user")),
                Some(("user", Via::Default))
            );
            assert_eq!(routes.resolve(None, path, known, None), None);
        }
    }

    #[test]
    fn anything_else_has_no_route() {
        let routes = shop();
        for path in [
            "/",
            "",
            "/other.v1.Svc/M",
            "/nomethod",
            "shop.payment.v1.P/C",
        ] {
            assert_eq!(
                routes.resolve(Some("10.0.0.1"), path, known, Some("user")),
                None,
                "{path:?}"
            );
        }
    }

    #[test]
    fn route_flags_are_parsed() {
        assert_eq!(
            parse_route("shop.payment.=payment").unwrap(),
            ("shop.payment.".into(), "payment".into())
        );
        assert_eq!(parse_route("/a.B/=b").unwrap(), ("a.B/".into(), "b".into()));
        for bad in ["", "x", "=y", "x="] {
            assert!(parse_route(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_prefix_ends_on_a_name_boundary() {
        let routes = Routes::new([("acme.echo".to_owned(), "echo".to_owned())]);
        let resolve = |path| routes.resolve(None, path, |_| true, None).map(|r| r.0);
        assert_eq!(resolve("/acme.echo.v1.Echo/Say"), Some("echo"));
        assert_eq!(resolve("/acme.echo/Say"), Some("echo"));
        assert_eq!(resolve("/acme.echoes.v1.Echo/Say"), None);
        let method = Routes::new([("acme.echo.v1.Echo/Say".to_owned(), "echo".to_owned())]);
        let resolve = |path| method.resolve(None, path, |_| true, None).map(|r| r.0);
        assert_eq!(resolve("/acme.echo.v1.Echo/Say"), Some("echo"));
        assert_eq!(resolve("/acme.echo.v1.Echo/SayMore"), None);
    }
}

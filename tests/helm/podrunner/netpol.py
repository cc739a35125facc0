"""NetworkPolicy admission, evaluated as a CNI would (networking.k8s.io/v1 semantics).

Nothing is enforced here (no CNI); the runner records every TCP connection each pod accepted
or opened, and these functions say whether the rendered policies admit it.
"""

import ipaddress


def selects(selector, labels):
    """A LabelSelector (matchLabels, matchExpressions) against a label map; {} selects all."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Peer:
    """One end of a connection: a pod (namespace, labels, named ports) or a bare address."""

    def __init__(self, ip, namespace=None, labels=None, ports=None, name=None, namespace_labels=None):
        self.ip = ip
        self.namespace = namespace
        self.labels = labels or {}
        self.ports = ports or {}  # port name -> number
        self.name = name or ip
        self.namespace_labels = namespace_labels or ({"kubernetes.io/metadata.name": namespace} if namespace else {})

    @property
    def is_pod(self):
        return self.namespace is not None


def policy_types(policy):
    spec = policy["spec"]
    if "policyTypes" in spec:
        return spec["policyTypes"]
    return ["Ingress"] + (["Egress"] if "egress" in spec else [])


def _peer_matches(peer_spec, policy_namespace, other):
    if "ipBlock" in peer_spec:
        block = peer_spec["ipBlock"]
        ip = ipaddress.ip_address(other.ip)
        if ip not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(ip in ipaddress.ip_network(e) for e in block.get("except", []))
    if not other.is_pod:
        return False
    if "namespaceSelector" in peer_spec:
        if not selects(peer_spec["namespaceSelector"], other.namespace_labels):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer_spec.get("podSelector"), other.labels)


def _port_matches(port_specs, port, target):
    if not port_specs:
        return True
    for spec in port_specs:
        if spec.get("protocol", "TCP") != "TCP":
            continue
        wanted = spec.get("port")
        if wanted is None:
            return True
        if isinstance(wanted, str):
            wanted = target.ports.get(wanted)
            if wanted is None:
                continue
        if wanted <= port <= spec.get("endPort", wanted):
            return True
    return False


def admits(policies, direction, subject, other, port, namespace):
    """Whether the policies admit a connection on `port`. direction "Ingress": `subject` (a pod
    in `namespace`) accepts it from `other`; "Egress": `subject` opens it to `other`. Returns
    (admitted, why) where why names the deciding policy or that none isolates the subject."""
    isolating = [p for p in policies
                 if p["metadata"].get("namespace", namespace) == subject.namespace
                 and direction in policy_types(p)
                 and selects(p["spec"].get("podSelector"), subject.labels)]
    if not isolating:
        return True, f"no {direction} policy selects {subject.name}"
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    # The named port belongs to the pod being reached.
    target = subject if direction == "Ingress" else other
    for policy in isolating:
        for rule in policy["spec"].get(key) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(p, policy["metadata"].get("namespace", namespace), other) for p in peers):
                continue
            if _port_matches(rule.get("ports"), port, target):
                return True, f"{policy['metadata']['name']} {key} rule {rule}"
    names = [p["metadata"]["name"] for p in isolating]
    return False, f"{direction} of {subject.name} is limited by {names} and no rule admits {other.name} on port {port}"

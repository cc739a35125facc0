"""JSON schemas for the custom resources the chart may render, which the Kubernetes schemas of
kubernetes-validate do not cover (kubeconform would skip them with -ignore-missing-schemas).

Written for these tests from the CRDs' API references (cert-manager.io/v1 Certificate,
monitoring.coreos.com/v1 PodMonitor, gateway.networking.k8s.io/v1 GRPCRoute): only the fields the
chart can write are allowed, with their types, so a misspelt or misplaced field fails as it would
at the API server's structural-schema pruning (where it would be dropped silently).
"""

import jsonschema

NAME = {"type": "string", "minLength": 1, "maxLength": 253, "pattern": "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": NAME,
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}
LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
HOSTNAME = {"type": "string", "pattern": r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
ISSUER_REF = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                   "group": {"type": "string"}},
}
USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
          "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
          "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
          "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}


def resource(api_version, kind, spec):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": METADATA, "spec": spec},
    }


CERTIFICATE = resource("cert-manager.io/v1", "Certificate", {
    "type": "object",
    "required": ["secretName", "issuerRef"],
    "additionalProperties": False,
    "properties": {
        "secretName": NAME,
        "duration": DURATION,
        "renewBeforePercentage": {"type": "integer", "minimum": 1, "maximum": 99},
        "privateKey": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]}, "size": {"type": "integer"},
                           "rotationPolicy": {"enum": ["Never", "Always"]}},
        },
        "usages": {"type": "array", "items": {"enum": USAGES}},
        "uris": {"type": "array", "items": {"type": "string", "pattern": "^[a-z][a-z0-9+.-]*:"}},
        "dnsNames": {"type": "array", "minItems": 1, "items": HOSTNAME},
        "issuerRef": ISSUER_REF,
    },
    "anyOf": [{"required": ["dnsNames"]}, {"required": ["uris"]}],
})

POD_MONITOR = resource("monitoring.coreos.com/v1", "PodMonitor", {
    "type": "object",
    "required": ["selector", "podMetricsEndpoints"],
    "additionalProperties": False,
    "properties": {
        "selector": LABEL_SELECTOR,
        "namespaceSelector": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}},
        },
        "podTargetLabels": {"type": "array", "items": {"type": "string"}},
        "podMetricsEndpoints": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["port"],
                "additionalProperties": False,
                "properties": {
                    "port": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 15},
                    "path": {"type": "string", "pattern": "^/"},
                    "interval": {"type": "string", "pattern": r"^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                },
            },
        },
    },
})

GRPC_ROUTE = resource("gateway.networking.k8s.io/v1", "GRPCRoute", {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "parentRefs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 32,
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"group": {"type": "string"}, "kind": {"type": "string"}, "namespace": {"type": "string"},
                               "name": {"type": "string", "minLength": 1}, "sectionName": {"type": "string"},
                               "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
            },
        },
        "hostnames": {"type": "array", "maxItems": 16, "items": HOSTNAME},
        "rules": {
            "type": "array",
            "maxItems": 16,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "backendRefs": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "port"],
                            "additionalProperties": False,
                            "properties": {"name": NAME, "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
                        },
                    },
                },
            },
        },
    },
})

SCHEMAS = {(s["properties"]["apiVersion"]["const"], s["properties"]["kind"]["const"]): s
           for s in (CERTIFICATE, POD_MONITOR, GRPC_ROUTE)}


def is_custom(obj):
    return (obj.get("apiVersion"), obj.get("kind")) in SCHEMAS


def validate(obj):
    """Raises jsonschema.ValidationError when obj does not fit its CRD's schema."""
    jsonschema.validate(obj, SCHEMAS[(obj["apiVersion"], obj["kind"])])

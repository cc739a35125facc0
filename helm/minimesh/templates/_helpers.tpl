{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "minimesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, unless the release already contains the chart name. */}}
{{- define "minimesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "minimesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The shop (shop.yaml at the chart's root, the list `minimesh up` and the tests read too): its
     services in listed order, each {name, route, upstreams, allow}, as JSON {"services": [...]}.
     Checked and cached once per render; values naming services it does not list fail the render. */}}
{{- define "minimesh.shop" -}}
{{- if not (hasKey . "minimeshShop") }}
{{- $shop := .Files.Get "shop.yaml" | fromYaml }}
{{- if or (not $shop) (hasKey $shop "Error") (not (kindIs "slice" $shop.services)) }}
{{- fail (printf "shop.yaml is missing or not a list of services: %v" (dig "Error" "" ($shop | default dict))) }}
{{- end }}
{{- $names := list }}
{{- range $shop.services }}
{{- $names = append $names .name }}
{{- end }}
{{- range $shop.services }}
{{- range .upstreams }}
{{- if not (has . $names) }}
{{- fail (printf "shop.yaml: a service calls %s, which is not listed" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $_ := .Values.services }}
{{- if not (has $name $names) }}
{{- fail (printf "services.%s: %s is not a service of the shop (shop.yaml lists %s)" $name $name (join ", " $names)) }}
{{- end }}
{{- end }}
{{- range $name, $_ := .Values.mesh.policy }}
{{- if not (has $name $names) }}
{{- fail (printf "mesh.policy.%s: %s is not a service of the shop (shop.yaml lists %s)" $name $name (join ", " $names)) }}
{{- end }}
{{- end }}
{{- range .Values.gateway.expose }}
{{- if not (has . $names) }}
{{- fail (printf "gateway.expose: %s is not a service of the shop (shop.yaml lists %s)" . (join ", " $names)) }}
{{- end }}
{{- end }}
{{- $_ := set . "minimeshShop" $shop }}
{{- end }}
{{- get . "minimeshShop" | toJson }}
{{- end }}

{{/* The shop's service names, in listed order, as a JSON array. */}}
{{- define "minimesh.serviceNames" -}}
{{- $names := list }}
{{- range (include "minimesh.shop" . | fromJson).services }}
{{- $names = append $names .name }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* Knobs of a service that values.yaml does not mention (services.<name>), as those of the
     three listed there: adding a service to shop.yaml needs no values. */}}
{{- define "minimesh.serviceDefaults" -}}
replicas: 1
env: []
resources:
  requests: {cpu: 50m, memory: 64Mi}
  limits: {cpu: 500m, memory: 256Mi}
autoscaling: {enabled: false, minReplicas: 2, maxReplicas: 5, targetCPUUtilizationPercentage: 70}
podAnnotations: {}
podLabels: {}
nodeSelector: {}
tolerations: []
affinity: {}
topologySpreadConstraints: []
{{- end }}

{{/* Common labels. Call with (dict "root" $ "component" "order"). */}}
{{- define "minimesh.labels" -}}
helm.sh/chart: {{ include "minimesh.chart" .root }}
{{ include "minimesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: minimesh
{{- end }}

{{- define "minimesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "minimesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference: [registry/]repository@digest, or [registry/]repository:tag. global.imageRegistry
     (a parent chart's, or this chart's) replaces the image's own registry.
     Call with (dict "root" $ "image" .Values.jaeger.image), "defaultTag" optional. */}}
{{- define "minimesh.imageRef" -}}
{{- $image := .image }}
{{- $registry := default $image.registry (dig "imageRegistry" "" (.root.Values.global | default dict)) }}
{{- $ref := $image.repository }}
{{- with $registry }}
{{- $ref = printf "%s/%s" (trimSuffix "/" .) $ref }}
{{- end }}
{{- if $image.digest }}
{{- printf "%s@%s" $ref $image.digest }}
{{- else }}
{{- printf "%s:%s" $ref (default .defaultTag $image.tag) }}
{{- end }}
{{- end }}

{{/* The minimesh image (its tag defaults to the chart's appVersion). Call with the root context. */}}
{{- define "minimesh.image" -}}
{{- include "minimesh.imageRef" (dict "root" . "image" .Values.image "defaultTag" .Chart.AppVersion) }}
{{- end }}

{{/* imagePullSecrets of every pod: the chart's and global ones. Call with the root context. */}}
{{- define "minimesh.imagePullSecrets" -}}
{{- $secrets := concat (.Values.imagePullSecrets | default list) (dig "imagePullSecrets" list (.Values.global | default dict)) | uniq }}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The absolute DNS name of a Service of the release's namespace, with the final dot: the
     resolver asks for exactly this name, never walking the search path. Call with
     (dict "root" $ "name" "shop-minimesh-user-headless"). */}}
{{- define "minimesh.serviceFqdn" -}}
{{- printf "%s.%s.svc.%s." .name .root.Release.Namespace (trimSuffix "." .root.Values.clusterDomain) }}
{{- end }}

{{/* A pod template's metadata: the chart's labels over the component's podLabels over the
     chart-wide ones; the given checksum annotations over the component's podAnnotations over the
     chart-wide ones. Call with (dict "root" $ "component" "order" "values" $componentValues
     "annotations" (dict "checksum/config" ...)). */}}
{{- define "minimesh.podMetadata" -}}
{{- $root := .root }}
{{- $own := .values | default dict }}
{{- $labels := include "minimesh.labels" (dict "root" $root "component" .component) | fromYaml }}
{{- $labels = merge $labels (deepCopy ($own.podLabels | default dict)) (deepCopy ($root.Values.podLabels | default dict)) }}
{{- $annotations := merge (deepCopy (.annotations | default dict)) (deepCopy ($own.podAnnotations | default dict)) (deepCopy ($root.Values.podAnnotations | default dict)) }}
labels:
  {{- toYaml $labels | nindent 2 }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* cert-manager's Secret for one identity: ca.crt, tls.crt and tls.key. */}}
{{- define "minimesh.identitySecret" -}}
{{- printf "%s-%s-identity" (include "minimesh.fullname" .root) .name }}
{{- end }}

{{/* The identity issuer's Service, and the DNS names its serving certificate carries. */}}
{{- define "minimesh.issuer" -}}
{{- printf "%s-identity" (include "minimesh.fullname" .) }}
{{- end }}

{{/* The issuer's TLS name (one of the DNS names its serving certificate carries). */}}
{{- define "minimesh.issuerHost" -}}
{{- printf "%s.%s.svc" (include "minimesh.issuer" .) .Release.Namespace }}
{{- end }}

{{- define "minimesh.issuerServerNames" -}}
{{- $svc := include "minimesh.issuer" . }}
{{- list $svc (printf "%s.%s" $svc .Release.Namespace) (include "minimesh.issuerHost" .) (printf "%s.%s" (include "minimesh.issuerHost" .) (trimSuffix "." .Values.clusterDomain)) | join "," }}
{{- end }}

{{/* The Secret holding the trust anchor (tls.crt, tls.key): the user's, or the release's own. */}}
{{- define "minimesh.trustAnchorSecret" -}}
{{- default (printf "%s-trust-anchor" (include "minimesh.fullname" .)) .Values.identity.trustAnchor.existingSecret }}
{{- end }}

{{/* The trust anchor PEMs as JSON {"cert", "key"} when the release owns them: from values, from the
     Secret an earlier install created (lookup), or generated now. Ed25519 because the issuer reads
     PKCS#8 keys only, and that is the form Helm writes Ed25519 keys in. Resolved once per render
     (kept on the root context) so the Secret, the ConfigMap and the checksums agree. */}}
{{- define "minimesh.trustAnchor" -}}
{{- if not (hasKey . "minimeshTrustAnchor") }}
{{- $ta := .Values.identity.trustAnchor }}
{{- $pems := dict }}
{{- if or $ta.certPem $ta.keyPem }}
{{- if not (and $ta.certPem $ta.keyPem) }}
{{- fail "identity.trustAnchor: give both certPem and keyPem" }}
{{- end }}
{{- if not (contains "-----BEGIN PRIVATE KEY-----" $ta.keyPem) }}
{{- fail "identity.trustAnchor.keyPem must be a PKCS#8 PEM key (-----BEGIN PRIVATE KEY-----); convert with: openssl pkcs8 -topk8 -nocrypt" }}
{{- end }}
{{- if not (contains "-----BEGIN CERTIFICATE-----" $ta.certPem) }}
{{- fail "identity.trustAnchor.certPem must be a PEM certificate (-----BEGIN CERTIFICATE-----)" }}
{{- end }}
{{- $pems = dict "cert" $ta.certPem "key" $ta.keyPem }}
{{- else }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "minimesh.trustAnchorSecret" .) }}
{{- $data := dig "data" (dict) $existing }}
{{- if and (index $data "tls.crt") (index $data "tls.key") }}
{{- $pems = dict "cert" (index $data "tls.crt" | b64dec) "key" (index $data "tls.key" | b64dec) }}
{{- else }}
{{- $ca := genCAWithKey "minimesh trust anchor" 3650 (genPrivateKey "ed25519") }}
{{- $pems = dict "cert" $ca.Cert "key" $ca.Key }}
{{- end }}
{{- end }}
{{- $_ := set . "minimeshTrustAnchor" $pems }}
{{- end }}
{{- get . "minimeshTrustAnchor" | toJson }}
{{- end }}

{{/* What proxies trust, for the pods' checksum annotations: the release's certificate, or the
     name of the user's Secret (its content is not known at render time). */}}
{{- define "minimesh.trustChecksum" -}}
{{- if .Values.certManager.enabled }}
{{- "cert-manager" | sha256sum }}
{{- else if .Values.identity.trustAnchor.existingSecret }}
{{- .Values.identity.trustAnchor.existingSecret | sha256sum }}
{{- else }}
{{- (include "minimesh.trustAnchor" . | fromJson).cert | sha256sum }}
{{- end }}
{{- end }}

{{/* Environment of a proxy (sidecar or gateway) for its identity. Call with the root context. */}}
{{- define "minimesh.proxyIdentityEnv" -}}
{{- if .Values.certManager.enabled }}
- name: MINIMESH_CA
  value: /var/run/minimesh/identity/ca.crt
- name: MINIMESH_CERT
  value: /var/run/minimesh/identity/tls.crt
- name: MINIMESH_KEY
  value: /var/run/minimesh/identity/tls.key
{{- else }}
# The key is made in memory; the issuer signs it for the ServiceAccount the token proves.
- name: MINIMESH_CA
  value: /var/run/minimesh/trust/ca.crt
# Dialled by its absolute name; the TLS name below is checked against the issuer's certificate.
- name: MINIMESH_IDENTITY_ADDR
  value: {{ printf "https://%s:8443" (include "minimesh.serviceFqdn" (dict "root" . "name" (include "minimesh.issuer" .))) | quote }}
- name: MINIMESH_IDENTITY_SERVER_NAME
  value: {{ include "minimesh.issuerHost" . | quote }}
- name: MINIMESH_IDENTITY_TOKEN_FILE
  value: /var/run/secrets/minimesh/token
- name: MINIMESH_NAMESPACE
  valueFrom:
    fieldRef: {fieldPath: metadata.namespace}
{{- end }}
{{- end }}

{{/* Mounts of a proxy for its identity. Call with the root context. */}}
{{- define "minimesh.proxyIdentityMounts" -}}
{{- if .Values.certManager.enabled }}
- name: identity
  mountPath: /var/run/minimesh/identity
  readOnly: true
{{- else }}
- name: trust-anchor
  mountPath: /var/run/minimesh/trust
  readOnly: true
- name: identity-token
  mountPath: /var/run/secrets/minimesh
  readOnly: true
{{- end }}
{{- end }}

{{/* Volumes of a proxy pod for its identity. Call with (dict "root" $ "name" "order"). */}}
{{- define "minimesh.proxyIdentityVolumes" -}}
{{- $root := .root }}
{{- if $root.Values.certManager.enabled }}
- name: identity
  secret:
    secretName: {{ include "minimesh.identitySecret" . }}
    defaultMode: 0440
{{- else }}
# The trust anchor's certificate only: never its key.
- name: trust-anchor
  projected:
    defaultMode: 0444
    sources:
      {{- if $root.Values.identity.trustAnchor.existingSecret }}
      - secret:
          name: {{ $root.Values.identity.trustAnchor.existingSecret }}
          items: [{key: tls.crt, path: ca.crt}]
      {{- else }}
      - configMap:
          name: {{ include "minimesh.fullname" $root }}-trust-anchor
          items: [{key: ca.crt, path: ca.crt}]
      {{- end }}
# A short-lived token bound to the issuer's audience; kubelet renews it before it expires.
- name: identity-token
  projected:
    defaultMode: 0440
    sources:
      - serviceAccountToken:
          audience: minimesh-identity
          expirationSeconds: 3600
          path: token
{{- end }}
{{- end }}

{{/* Where traces go: the bundled Jaeger, an existing collector, or nowhere. */}}
{{- define "minimesh.otlpEndpoint" -}}
{{- if .Values.jaeger.enabled }}
{{- printf "http://%s:4317" (include "minimesh.serviceFqdn" (dict "root" . "name" (printf "%s-jaeger" (include "minimesh.fullname" .)))) }}
{{- else }}
{{- .Values.tracing.otlpEndpoint }}
{{- end }}
{{- end }}

{{/* Tracing environment of one component. Call with (dict "root" $ "serviceName" "minimesh-order"). */}}
{{- define "minimesh.tracingEnv" -}}
{{- $endpoint := include "minimesh.otlpEndpoint" .root }}
{{- if $endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $endpoint | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .root.Values.tracing.sampler | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .root.Values.tracing.samplerArg | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ .serviceName | quote }}
{{- end }}

{{/* The headless Service name of a mesh service (its pods' inbound listeners). */}}
{{- define "minimesh.headless" -}}
{{- printf "%s-%s-headless" (include "minimesh.fullname" .root) .name }}
{{- end }}

{{/* Sidecar (or gateway) configuration file, as JSON (a subset of YAML the proxy reads).
     Call with (dict "root" $ "service" "order" "upstreams" (list "user" "payment")). Routes and
     the default allow-list come from shop.yaml; mesh.policy.<service> replaces the latter. */}}
{{- define "minimesh.proxyConfig" -}}
{{- $root := .root }}
{{- $shop := dict }}
{{- range (include "minimesh.shop" $root | fromJson).services }}
{{- $_ := set $shop .name . }}
{{- end }}
{{- $upstreams := dict }}
{{- range .upstreams }}
{{- $_ := set $upstreams . (dict "dns" (printf "%s:4143" (include "minimesh.serviceFqdn" (dict "root" $root "name" (include "minimesh.headless" (dict "root" $root "name" .)))))) }}
{{- end }}
{{- /* The proxy knows no protos: the gRPC package prefix of each upstream is configuration. */}}
{{- $routes := dict }}
{{- range .upstreams }}
{{- $_ := set $routes (get $shop .).route . }}
{{- end }}
{{- $config := dict "trustDomain" $root.Values.mesh.trustDomain "namespace" $root.Release.Namespace "upstreams" $upstreams "routes" $routes }}
{{- if .service }}
{{- $_ := set $config "service" .service }}
{{- $policy := $root.Values.mesh.policy | default dict }}
{{- $_ := set $config "allow" (hasKey $policy .service | ternary (get $policy .service) (get $shop .service).allow) }}
{{- end }}
{{- $traffic := $root.Values.mesh.traffic }}
{{- $_ := set $config "retries" (dict "maxAttempts" $traffic.maxAttempts "budgetPercent" $traffic.budgetPercent "minPerSecond" $traffic.minPerSecond) }}
{{- $_ := set $config "ejection" (dict "consecutiveFailures" $traffic.ejectAfter) }}
{{- if gt (int $traffic.perTryTimeoutMs) 0 }}
{{- $_ := set $config "timeouts" (dict "perTryMs" $traffic.perTryTimeoutMs) }}
{{- end }}
{{- toPrettyJson $config }}
{{- end }}

{{/* A pod's scheduling and pull secrets: each of nodeSelector, tolerations, affinity and
     topologySpreadConstraints from the component's values when set, else the chart-wide one. A
     spread constraint without a labelSelector gets the component's pod labels. Call with
     (dict "root" $ "component" "order" "values" $componentValues). */}}
{{- define "minimesh.scheduling" -}}
{{- $root := .root }}
{{- $own := .values | default dict }}
{{- with default $root.Values.nodeSelector $own.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with default $root.Values.tolerations $own.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with default $root.Values.affinity $own.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $spread := list }}
{{- range default $root.Values.topologySpreadConstraints $own.topologySpreadConstraints }}
{{- $constraint := deepCopy . }}
{{- if not $constraint.labelSelector }}
{{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "minimesh.selectorLabels" (dict "root" $root "component" $.component) | fromYaml)) }}
{{- end }}
{{- $spread = append $spread $constraint }}
{{- end }}
{{- with $spread }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- include "minimesh.imagePullSecrets" $root }}
{{- end }}

{{/* Who this pod is, for traces: its name (a Deployment's pods have no ordinal) and, in a
     StatefulSet, its ordinal as MINIMESH_REPLICA (the pod-index label Kubernetes 1.28+ sets).
     Call with (dict "root" $ "statefulSet" true). */}}
{{- define "minimesh.podEnv" -}}
- name: MINIMESH_POD_NAME
  valueFrom:
    fieldRef: {fieldPath: metadata.name}
{{- if .statefulSet }}
- name: MINIMESH_REPLICA
  valueFrom:
    fieldRef: {fieldPath: "metadata.labels['apps.kubernetes.io/pod-index']"}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.namespace.name=%s,k8s.pod.name=$(MINIMESH_POD_NAME)" .root.Release.Namespace | quote }}
{{- end }}

{{/* The sidecar container of a service pod. Call with (dict "root" $ "name" "order" "statefulSet" bool). */}}
{{- define "minimesh.sidecarContainer" -}}
- name: sidecar
  image: {{ include "minimesh.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  # The proxy-only binary of the image (same flags as `minimesh sidecar`): less code resident in
  # every pod than the whole CLI.
  command: ["/usr/local/bin/minimesh-proxy"]
  args: ["sidecar"]
  env:
    - name: MINIMESH_CONFIG
      value: /etc/minimesh/sidecar.yaml
    - name: MINIMESH_INBOUND
      value: "0.0.0.0:4143"
    - name: MINIMESH_OUTBOUND
      value: "127.0.0.1:4140"
    - name: MINIMESH_ADMIN
      value: "0.0.0.0:4191"
    - name: MINIMESH_APP
      value: "127.0.0.1:8080"
    - name: MINIMESH_MAX_APP_STREAMS
      value: {{ .root.Values.sidecar.maxAppStreams | int | quote }}
    - name: MINIMESH_STALL_TIMEOUT
      value: {{ .root.Values.sidecar.stallTimeout | quote }}
    - name: MINIMESH_STREAM_WINDOW
      value: {{ .root.Values.sidecar.streamWindow | int | quote }}
    - name: MINIMESH_CONNECTION_WINDOW
      value: {{ .root.Values.sidecar.connectionWindow | int | quote }}
    {{- include "minimesh.podEnv" (dict "root" .root "statefulSet" .statefulSet) | nindent 4 }}
    {{- include "minimesh.proxyIdentityEnv" .root | nindent 4 }}
    {{- include "minimesh.tracingEnv" (dict "root" .root "serviceName" (printf "minimesh-sidecar-%s" .name)) | nindent 4 }}
  ports:
    - name: mesh
      containerPort: 4143
    - name: admin
      containerPort: 4191
  # Up to 90 s for the first certificate (the proxy gives up after 60 s and is restarted). On
  # /live, not /ready: a native sidecar must start before its service can report SERVING.
  startupProbe:
    httpGet: {path: /live, port: admin}
    periodSeconds: 2
    failureThreshold: 45
  livenessProbe:
    httpGet: {path: /live, port: admin}
    periodSeconds: 10
  # Ready only while the local service reports SERVING: the pod's readiness.
  readinessProbe:
    httpGet: {path: /ready, port: admin}
    periodSeconds: 5
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .root.Values.sidecar.resources | nindent 4 }}
  volumeMounts:
    {{- include "minimesh.proxyIdentityMounts" .root | nindent 4 }}
    - name: sidecar-config
      mountPath: /etc/minimesh
      readOnly: true
{{- end }}

{{/* Where the services keep their data: "sqlite" (the default: one volume per pod), "postgresql"
     (the server the chart deploys) or "external" (externalDatabase.existingSecret). */}}
{{- define "minimesh.storage" -}}
{{- if and .Values.postgresql.enabled .Values.externalDatabase.existingSecret }}
{{- fail "postgresql.enabled=true and externalDatabase.existingSecret are exclusive: deploy PostgreSQL with the chart, or use the existing database, not both" }}
{{- else if .Values.postgresql.enabled }}
{{- "postgresql" }}
{{- else if .Values.externalDatabase.existingSecret }}
{{- "external" }}
{{- else }}
{{- "sqlite" }}
{{- end }}
{{- end }}

{{/* The chart's PostgreSQL: its StatefulSet, Service and credentials Secret share this name. */}}
{{- define "minimesh.postgresql" -}}
{{- printf "%s-postgresql" (include "minimesh.fullname" .) }}
{{- end }}

{{/* The role, and the database it owns, of one service in the chart's PostgreSQL. */}}
{{- define "minimesh.postgresqlRole" -}}
{{- printf "minimesh_%s" . }}
{{- end }}

{{/* Passwords of the chart's PostgreSQL as JSON {"postgres", and one per service}: from the
     Secret an earlier install created (lookup), or generated now. The server's data directory is
     initialised with them once, so they must never change. Resolved once per render. */}}
{{- define "minimesh.postgresqlPasswords" -}}
{{- if not (hasKey . "minimeshPostgresqlPasswords") }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "minimesh.postgresql" .) }}
{{- $data := dig "data" (dict) $existing }}
{{- $passwords := dict }}
{{- range $who := prepend (include "minimesh.serviceNames" . | fromJsonArray) "postgres" }}
{{- $key := printf "%s-password" $who }}
{{- if index $data $key }}
{{- $_ := set $passwords $who (index $data $key | b64dec) }}
{{- else }}
{{- /* Letters and digits only: nothing to escape in a URL or in SQL. */}}
{{- $_ := set $passwords $who (randAlphaNum 32) }}
{{- end }}
{{- end }}
{{- $_ := set . "minimeshPostgresqlPasswords" $passwords }}
{{- end }}
{{- get . "minimeshPostgresqlPasswords" | toJson }}
{{- end }}

{{/* Where a service container reads MINIMESH_DB from: a Secret and key, never an inline URL.
     Call with (dict "root" $ "name" "order"); only with a database. */}}
{{- define "minimesh.databaseSecretRef" -}}
{{- if eq (include "minimesh.storage" .root) "postgresql" }}
name: {{ include "minimesh.postgresql" .root }}
key: {{ .name }}-url
{{- else }}
name: {{ .root.Values.externalDatabase.existingSecret }}
key: {{ .root.Values.externalDatabase.secretKey }}
{{- end }}
{{- end }}

{{/* The chart's PostgreSQL init script (/docker-entrypoint-initdb.d): per service, a login role
     and a database owned by it that no other role may connect to. The entrypoint runs it against
     its temporary server (socket only), with POSTGRES_USER and PGPASSWORD exported. */}}
{{- define "minimesh.postgresqlInit" -}}
#!/usr/bin/env bash
set -euo pipefail
for service in {{ include "minimesh.serviceNames" . | fromJsonArray | join " " }}; do
  password_var="MINIMESH_${service^^}_PASSWORD"
  # psql variables quote the names and the password (:"x" as an identifier, :'x' as a literal).
  psql -v ON_ERROR_STOP=1 --no-psqlrc --no-password --username "$POSTGRES_USER" --dbname postgres \
    --set role="minimesh_${service}" --set password="${!password_var}" <<'SQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"role" OWNER :"role";
REVOKE ALL ON DATABASE :"role" FROM PUBLIC;
SQL
done
{{- end }}

{{/* Jaeger v2's configuration: OTLP/gRPC in, the memory store capped at jaeger.maxTraces, the UI
     and its API, a health endpoint for the probes. Listeners on every address: the defaults of
     recent releases are localhost. */}}
{{- define "minimesh.jaegerConfig" -}}
service:
  extensions: [jaeger_storage, jaeger_query, healthcheckv2]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    logs:
      level: info
extensions:
  healthcheckv2:
    use_v2: true
    http:
      endpoint: 0.0.0.0:13133
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: {{ int .Values.jaeger.maxTraces }}
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 0.0.0.0:16686
    grpc:
      endpoint: 0.0.0.0:16685
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 0.0.0.0:4317
processors:
  batch: {}
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
{{- end }}

{{/* ServiceAccounts of mesh identities are named <prefix><identity>, so two releases can share a
namespace; the issuer takes the prefix off (MINIMESH_SERVICE_ACCOUNT_PREFIX) to form
spiffe://<td>/ns/<ns>/sa/<identity>. */}}
{{- define "minimesh.serviceAccountPrefix" -}}
{{- printf "%s-" (include "minimesh.fullname" .) -}}
{{- end }}

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

{{- define "minimesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Secret holding one identity's ca.crt, tls.crt and tls.key. */}}
{{- define "minimesh.identitySecret" -}}
{{- printf "%s-%s-identity" (include "minimesh.fullname" .root) .name }}
{{- end }}

{{- define "minimesh.caSecret" -}}
{{- default (printf "%s-ca" (include "minimesh.fullname" .)) .Values.certificates.existingCASecret }}
{{- end }}

{{/* Where traces go: the bundled Jaeger, an existing collector, or nowhere. */}}
{{- define "minimesh.otlpEndpoint" -}}
{{- if .Values.jaeger.enabled }}
{{- printf "http://%s-jaeger:4317" (include "minimesh.fullname" .) }}
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
     Call with (dict "root" $ "service" "order" "upstreams" (list "user" "payment")). */}}
{{- define "minimesh.proxyConfig" -}}
{{- $root := .root }}
{{- $upstreams := dict }}
{{- range .upstreams }}
{{- $_ := set $upstreams . (dict "dns" (printf "%s.%s.svc.cluster.local:4143" (include "minimesh.headless" (dict "root" $root "name" .)) $root.Release.Namespace)) }}
{{- end }}
{{- $config := dict "trustDomain" $root.Values.mesh.trustDomain "namespace" $root.Release.Namespace "upstreams" $upstreams }}
{{- if .service }}
{{- $_ := set $config "service" .service }}
{{- $_ := set $config "allow" (get $root.Values.mesh.policy .service) }}
{{- end }}
{{- $traffic := $root.Values.mesh.traffic }}
{{- $_ := set $config "retries" (dict "maxAttempts" $traffic.maxAttempts "budgetPercent" $traffic.budgetPercent "minPerSecond" $traffic.minPerSecond) }}
{{- $_ := set $config "ejection" (dict "consecutiveFailures" $traffic.ejectAfter) }}
{{- if gt (int $traffic.perTryTimeoutMs) 0 }}
{{- $_ := set $config "timeouts" (dict "perTryMs" $traffic.perTryTimeoutMs) }}
{{- end }}
{{- toPrettyJson $config }}
{{- end }}

{{/* Pod scheduling knobs shared by every workload. */}}
{{- define "minimesh.scheduling" -}}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The sidecar container of a service pod. Call with (dict "root" $ "name" "order"). */}}
{{- define "minimesh.sidecarContainer" -}}
- name: sidecar
  image: {{ include "minimesh.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
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
    - name: MINIMESH_CA
      value: /var/run/minimesh/identity/ca.crt
    - name: MINIMESH_CERT
      value: /var/run/minimesh/identity/tls.crt
    - name: MINIMESH_KEY
      value: /var/run/minimesh/identity/tls.key
    {{- include "minimesh.tracingEnv" (dict "root" .root "serviceName" (printf "minimesh-sidecar-%s" .name)) | nindent 4 }}
  ports:
    - name: mesh
      containerPort: 4143
    - name: admin
      containerPort: 4191
  livenessProbe:
    httpGet: {path: /live, port: admin}
    periodSeconds: 10
  readinessProbe:
    httpGet: {path: /ready, port: admin}
    periodSeconds: 5
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml .root.Values.sidecar.resources | nindent 4 }}
  volumeMounts:
    - name: identity
      mountPath: /var/run/minimesh/identity
      readOnly: true
    - name: sidecar-config
      mountPath: /etc/minimesh
      readOnly: true
{{- end }}

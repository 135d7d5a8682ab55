{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "podiam.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "podiam.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "podiam.server.fullname" -}}
{{- printf "%s-server" (include "podiam.fullname" .) }}
{{- end }}

{{- define "podiam.agent.fullname" -}}
{{- printf "%s-agent" (include "podiam.fullname" .) }}
{{- end }}

{{- define "podiam.server.serviceAccountName" -}}
{{- if .Values.server.serviceAccount.create }}
{{- default (include "podiam.server.fullname" .) .Values.server.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.server.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "podiam.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (include "podiam.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The headless Service's full DNS name: what agents dial and the server certificate names. */}}
{{- define "podiam.server.fqdn" -}}
{{- printf "%s.%s.svc.%s" (include "podiam.server.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{- define "podiam.agent.serverAddress" -}}
{{- default (printf "%s:%d" (include "podiam.server.fqdn" .) (int .Values.server.port)) .Values.agent.serverAddress }}
{{- end }}

{{/* Every name the server certificate must carry: the Service in each form agents may use,
and localhost / 127.0.0.1 for the in-container health probe. */}}
{{- define "podiam.server.dnsNames" -}}
{{- $svc := include "podiam.server.fullname" . }}
{{- $names := list $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (include "podiam.server.fqdn" .) "localhost" }}
{{- range .Values.tls.extraServerNames }}
{{- if not (regexMatch "^[0-9.]+$|:" .) }}
{{- $names = append $names . }}
{{- end }}
{{- end }}
{{- toJson (uniq $names) }}
{{- end }}

{{- define "podiam.server.ipAddresses" -}}
{{- $ips := list "127.0.0.1" }}
{{- range .Values.tls.extraServerNames }}
{{- if regexMatch "^[0-9.]+$|:" . }}
{{- $ips = append $ips . }}
{{- end }}
{{- end }}
{{- toJson (uniq $ips) }}
{{- end }}

{{/* The Secrets holding each side's tls.crt, tls.key and ca.crt. */}}
{{- define "podiam.server.tlsSecret" -}}
{{- if eq .Values.tls.mode "existingSecret" }}
{{- required "tls.existingSecret.server is required with tls.mode=existingSecret" .Values.tls.existingSecret.server }}
{{- else }}
{{- printf "%s-tls" (include "podiam.server.fullname" .) }}
{{- end }}
{{- end }}

{{- define "podiam.agent.tlsSecret" -}}
{{- if eq .Values.tls.mode "existingSecret" }}
{{- required "tls.existingSecret.agent is required with tls.mode=existingSecret" .Values.tls.existingSecret.agent }}
{{- else }}
{{- printf "%s-tls" (include "podiam.agent.fullname" .) }}
{{- end }}
{{- end }}

{{/* Labels ----------------------------------------------------------------------------------- */}}

{{- define "podiam.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "podiam.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: podiam
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "podiam.selectorLabels" -}}
app.kubernetes.io/name: {{ include "podiam.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "podiam.server.selectorLabels" -}}
{{ include "podiam.selectorLabels" (dict "root" . "component" "server") }}
{{- end }}

{{- define "podiam.agent.selectorLabels" -}}
{{ include "podiam.selectorLabels" (dict "root" . "component" "agent") }}
{{- end }}

{{- define "podiam.server.labels" -}}
{{ include "podiam.labels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "podiam.agent.labels" -}}
{{ include "podiam.labels" . }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "podiam.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The server's health check, run inside its container by the kubelet (exec probe): a
grpc.health.v1 Check over mutual TLS to 127.0.0.1, with the agent's client certificate. Exits 0
only when the server reports SERVING. Arguments: address, client certificate, key, CA. */}}
{{- define "podiam.server.healthCheck" -}}
import sys, grpc
from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g
address, cert, key, ca = sys.argv[1:5]
read = lambda path: open(path, "rb").read()
channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(read(ca), read(key), read(cert)))
status = g.HealthStub(channel).Check(h.HealthCheckRequest(), timeout=4).status
sys.exit(0 if status == h.HealthCheckResponse.SERVING else 1)
{{- end }}

{{- define "podiam.server.probeCommand" -}}
- python
- -c
- {{ include "podiam.server.healthCheck" . | quote }}
- {{ printf "127.0.0.1:%d" (int .Values.server.port) | quote }}
- /etc/podiam/probe/tls.crt
- /etc/podiam/probe/tls.key
- /etc/podiam/probe/ca.crt
{{- end }}

{{/* The token-credentials webhook: its Service and its serving certificate's Secret. */}}
{{- define "podiam.webhook.fullname" -}}
{{- printf "%s-webhook" (include "podiam.server.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "podiam.webhook.tlsSecret" -}}
{{- if eq .Values.tls.mode "generate" }}
{{- printf "%s-tls" (include "podiam.webhook.fullname" .) }}
{{- else }}
{{- required "tokenCredentials.webhook.existingSecret is required unless tls.mode=generate" .Values.tokenCredentials.webhook.existingSecret }}
{{- end }}
{{- end }}

{{/* Chart name, at most 63 characters. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name, with the chart name
appended unless the release name already contains it. At most 63 characters
(a DNS label); the longest suffix used is "-headless".
*/}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tandem.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ include "tandem.chart" . }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: inference-server
app.kubernetes.io/part-of: tandem
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tandem.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tandem.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "tandem.authSecretName" -}}
{{- default (printf "%s-auth" (include "tandem.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "tandem.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "tandem.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
The client CA: its own Secret, one made from tls.clientCA.cert, or the TLS Secret
(only a named one, tls.existingSecret: the one made from values holds no ca.crt).
*/}}
{{- define "tandem.clientCASecretName" -}}
{{- if .Values.tls.clientCA.existingSecret }}
{{- .Values.tls.clientCA.existingSecret }}
{{- else if .Values.tls.clientCA.cert }}
{{- printf "%s-client-ca" (include "tandem.fullname" .) }}
{{- else }}
{{- include "tandem.tlsSecretName" . }}
{{- end }}
{{- end }}

{{- define "tandem.metricsEnabled" -}}
{{- if gt (int .Values.telemetry.metricsPort) 0 }}true{{ end }}
{{- end }}

{{/*
Refuse values that would deploy something broken. Included by the Deployment,
so any render fails.
*/}}
{{- define "tandem.validate" -}}
{{- $grace := int .Values.server.shutdownGraceSeconds }}
{{- $preStop := int .Values.lifecycle.preStopSleepSeconds }}
{{- $termination := int .Values.terminationGracePeriodSeconds }}
{{- /* After the drain the server sends the final statuses (1 s), stops (0.25 s), closes the
engine and exports the last telemetry: 5 s leaves room for those. */}}
{{- if lt $termination (add $grace $preStop 5) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least server.shutdownGraceSeconds (%d) + lifecycle.preStopSleepSeconds (%d) + 5: after the drain the server still sends the final statuses, stops, closes the engine and exports telemetry, and the kubelet kills it at the deadline" $termination $grace $preStop) }}
{{- end }}
{{- if and .Values.tls.enabled (eq .Values.probes.type "grpc") }}
{{- fail "tls.enabled: the kubelet's gRPC probes cannot speak TLS; set probes.type to tcpSocket or exec" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.exemptHealth) (eq .Values.probes.type "grpc") }}
{{- fail "auth.exemptHealth=false: the kubelet's gRPC probes cannot send a token; keep auth.exemptHealth=true or set probes.type to exec" }}
{{- end }}
{{- if and (eq .Values.probes.type "exec") (not .Values.probes.exec.command) }}
{{- fail "probes.type=exec needs probes.exec.command" }}
{{- end }}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) (not .Values.auth.token) }}
{{- fail "auth.enabled needs auth.existingSecret or auth.token" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (not (and .Values.tls.cert .Values.tls.key)) }}
{{- fail "tls.enabled needs tls.existingSecret, or both tls.cert and tls.key" }}
{{- end }}
{{- if and .Values.tls.clientCA.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientCA.enabled (mutual TLS) needs tls.enabled" }}
{{- end }}
{{- $clientCA := .Values.tls.clientCA }}
{{- if and .Values.tls.enabled $clientCA.enabled (not .Values.tls.existingSecret) (not $clientCA.existingSecret) (not $clientCA.cert) }}
{{- fail "tls.clientCA.enabled needs tls.clientCA.cert or tls.clientCA.existingSecret: the TLS Secret the chart makes from tls.cert and tls.key holds no ca.crt" }}
{{- end }}
{{- if and (include "tandem.fetchesModels" .) (not .Values.modelCache.enabled) }}
{{- fail "modelFetch.enabled needs modelCache.enabled: the init container writes the weights into that volume" }}
{{- end }}
{{- /* Without the cache volume only the image's own files and mounted folders can load: a hub
id downloads into HF_HOME and a .gguf file is converted into TANDEM_CACHE, both there. */}}
{{- if and (not .Values.modelCache.enabled) .Values.securityContext.readOnlyRootFilesystem }}
{{- $extraNames := list }}
{{- range .Values.extraEnv }}
{{- $extraNames = append $extraNames .name }}
{{- end }}
{{- range $role := list "target" "draft" }}
{{- $source := toString (index $.Values.model $role) }}
{{- $gguf := hasSuffix ".gguf" (lower $source) }}
{{- $folder := and (hasPrefix "/" $source) (not $gguf) }}
{{- /* extraEnv may point either somewhere writable (an extraVolumes mount, /tmp). */}}
{{- $placed := has (ternary "TANDEM_CACHE" "HF_HOME" $gguf) $extraNames }}
{{- if not (or (eq $source "default") $folder $placed) }}
{{- fail (printf "model.%s=%s needs modelCache.enabled, or %s in extraEnv: a hub id downloads into HF_HOME and a .gguf file is converted into TANDEM_CACHE, both on that volume, and the root filesystem is read-only" $role $source (ternary "TANDEM_CACHE" "HF_HOME" $gguf)) }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "tandem.modelCacheClaim" . }}
{{- $strategy := default (dict) .Values.strategy }}
{{- $rolling := default (dict) $strategy.rollingUpdate }}
{{- /* The API defaults an unset maxSurge to 25%, which rounds up to one pod. */}}
{{- $surge := "25%" }}
{{- if hasKey $rolling "maxSurge" }}
{{- $surge = toString $rolling.maxSurge }}
{{- end }}
{{- $surges := and (ne (toString $strategy.type) "Recreate") (not (regexMatch "^0+%?$" $surge)) }}
{{- if and (has "ReadWriteOncePod" .Values.modelCache.persistence.accessModes) $surges }}
{{- fail "modelCache.persistence.accessModes has ReadWriteOncePod: the pod a rolling update adds first can never mount the claim, so the rollout hangs; set strategy.type=Recreate, or strategy.rollingUpdate.maxSurge=0 with maxUnavailable=1" }}
{{- end }}
{{- end }}
{{- if gt (int64 .Values.server.defaultMaxNewTokens) (int64 .Values.server.maxNewTokensLimit) }}
{{- fail (printf "server.defaultMaxNewTokens (%d) must not exceed server.maxNewTokensLimit (%d) (the server refuses to start)" (int64 .Values.server.defaultMaxNewTokens) (int64 .Values.server.maxNewTokensLimit)) }}
{{- end }}
{{- if and (ne (toString .Values.speculative.numTokens) "auto") (gt (int .Values.speculative.numTokens) (int .Values.speculative.maxTokens)) }}
{{- fail "speculative.numTokens must not exceed speculative.maxTokens (the server refuses to start)" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not (include "tandem.metricsEnabled" .)) }}
{{- fail "serviceMonitor.enabled needs telemetry.metricsPort > 0" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not (include "tandem.metricsEnabled" .)) }}
{{- fail "autoscaling.enabled needs telemetry.metricsPort > 0: the HPA scales on the pods' metrics" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- if and (include "tandem.metricsEnabled" .) (eq (int .Values.telemetry.metricsPort) (int .Values.server.port)) }}
{{- fail "telemetry.metricsPort must differ from server.port" }}
{{- end }}
{{- end }}

{{/*
A probe's handler: native gRPC against the health service, a TCP connect, or
a command. Called with (list $ .Values.probes.<name>).
*/}}
{{- define "tandem.probeHandler" -}}
{{- $root := index . 0 }}
{{- $probe := index . 1 }}
{{- if eq $root.Values.probes.type "grpc" }}
grpc:
  port: {{ int $root.Values.server.port }}
  {{- with $probe.service }}
  service: {{ . | quote }}
  {{- end }}
{{- else if eq $root.Values.probes.type "tcpSocket" }}
tcpSocket:
  port: grpc
{{- else }}
exec:
  command:
    {{- toYaml $root.Values.probes.exec.command | nindent 4 }}
{{- end }}
{{- toYaml (omit $probe "enabled" "service") | nindent 0 }}
{{- end }}

{{/*
Environment shared by the server and the fetch init container: which models,
where the cache is, and the operator's extras.
*/}}
{{- define "tandem.modelEnv" -}}
- name: TANDEM_TARGET
  value: {{ .Values.model.target | quote }}
- name: TANDEM_DRAFT
  value: {{ .Values.model.draft | quote }}
{{- if .Values.modelCache.enabled }}
- name: TANDEM_CACHE
  value: {{ .Values.modelCache.mountPath | quote }}
{{- $extraNames := list }}
{{- range .Values.extraEnv }}
{{- $extraNames = append $extraNames .name }}
{{- end }}
{{- if not (has "HF_HOME" $extraNames) }}
{{- /* Hub ids download through huggingface_hub: keep them on the cache volume too. */}}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (trimSuffix "/" .Values.modelCache.mountPath) | quote }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The PersistentVolumeClaim the model cache lives on: existingClaim whenever it is set (with
or without persistence.enabled), else the chart's own claim with persistence.enabled.
Empty for an emptyDir.
*/}}
{{- define "tandem.modelCacheClaim" -}}
{{- $persistence := .Values.modelCache.persistence }}
{{- if and .Values.modelCache.enabled (or $persistence.enabled $persistence.existingClaim) }}
{{- default (printf "%s-model-cache" (include "tandem.fullname" .)) $persistence.existingClaim }}
{{- end }}
{{- end }}

{{/* Mounts shared by the server and the fetch init container. */}}
{{- define "tandem.modelVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.modelCache.enabled }}
- name: model-cache
  mountPath: {{ .Values.modelCache.mountPath }}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Whether the init container fetches the default pair: modelFetch.enabled, and
model.target or model.draft is "default" (`tandem models fetch` fetches only
that pair; other sources load when the server starts). Empty when not.
*/}}
{{- define "tandem.fetchesModels" -}}
{{- if and .Values.modelFetch.enabled (or (eq (toString .Values.model.target) "default") (eq (toString .Values.model.draft) "default")) -}}
true
{{- end -}}
{{- end }}

{{- define "llm-fleet.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "llm-fleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llm-fleet.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "llm-fleet.redisHost" -}}
{{- printf "%s-redis" (include "llm-fleet.fullname" .) -}}
{{- end -}}

{{/* The bundled Valkey pods' Sentinels, host:port each (sentinel.enabled). */}}
{{- define "llm-fleet.sentinelAddresses" -}}
{{- $host := include "llm-fleet.redisHost" . -}}
{{- $addresses := list -}}
{{- range $i := until (int .Values.redis.sentinel.nodes) -}}
{{- $addresses = append $addresses (printf "%s-%d.%s-headless.%s.svc:26379" $host $i $host $.Release.Namespace) -}}
{{- end -}}
{{- join "," $addresses -}}
{{- end -}}

{{/* The URL processes connect to; $(REDIS_PASSWORD) is expanded by Kubernetes from the env below. */}}
{{- define "llm-fleet.redisUrl" -}}
{{- if and .Values.redis.bundled .Values.redis.sentinel.enabled -}}
redis+sentinel://{{ if .Values.redis.existingSecret }}:$(REDIS_PASSWORD)@{{ end }}{{ include "llm-fleet.sentinelAddresses" . }}/{{ .Values.redis.sentinel.masterName }}/0
{{- else if .Values.redis.bundled -}}
{{- if .Values.redis.existingSecret -}}
redis://:$(REDIS_PASSWORD)@{{ include "llm-fleet.redisHost" . }}:6379/0
{{- else -}}
redis://{{ include "llm-fleet.redisHost" . }}:6379/0
{{- end -}}
{{- else -}}
{{- required "redis.url is required when redis.bundled is false" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- define "llm-fleet.redisAddress" -}}
{{- if .Values.redis.sentinel.enabled -}}
{{- if .Values.redis.bundled -}}
{{- include "llm-fleet.sentinelAddresses" . -}}
{{- else -}}
{{- required "redis.sentinel.addresses (host:port,...) is required for KEDA with an external Sentinel set" .Values.redis.sentinel.addresses -}}
{{- end -}}
{{- else if .Values.redis.bundled -}}
{{- printf "%s.%s.svc:6379" (include "llm-fleet.redisHost" .) .Release.Namespace -}}
{{- else -}}
{{- required "redis.address (host:port) is required for KEDA when redis.bundled is false" .Values.redis.address -}}
{{- end -}}
{{- end -}}

{{/* Env shared by gateway and workers: the password first, so the URL can refer to it. */}}
{{- define "llm-fleet.redisEnv" -}}
{{- if .Values.redis.existingSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret }}
      key: {{ .Values.redis.existingSecretKey }}
{{- end }}
- name: LLM_FLEET_REDIS_URL
  value: {{ include "llm-fleet.redisUrl" . | quote }}
{{- end -}}

{{- define "llm-fleet.useKeda" -}}
{{- if or (eq .Values.autoscaling.mode "keda") (and (eq .Values.autoscaling.mode "auto") (.Capabilities.APIVersions.Has "keda.sh/v1alpha1")) -}}
true
{{- end -}}
{{- end -}}

{{/* Requests for a model whose workers scaled to zero must queue (the lag scales them back up). */}}
{{- define "llm-fleet.scalesToZero" -}}
{{- if include "llm-fleet.useKeda" . -}}
{{- range .Values.workerGroups -}}
{{- if eq (int .autoscaling.minReplicas) 0 -}}true{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

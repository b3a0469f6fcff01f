{{/* Names: "<release>-pantry", cut to the 63 characters DNS labels allow. */}}
{{- define "pantry.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pantry.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A role's object name: (dict "ctx" $ "role" "prefill") -> "<fullname>-prefill". */}}
{{- define "pantry.roleName" -}}
{{- printf "%s-%s" (include "pantry.fullname" .ctx | trunc 45 | trimSuffix "-") .role -}}
{{- end -}}

{{- define "pantry.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{ include "pantry.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: pantry
{{- end -}}

{{- define "pantry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pantry.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{- define "pantry.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A Kubernetes quantity ("1Gi") as a size the Pantry CLIs parse ("1GiB"). */}}
{{- define "pantry.cliSize" -}}
{{- if regexMatch "i$" . -}}{{ printf "%sB" . }}{{- else -}}{{ . }}{{- end -}}
{{- end -}}

{{/* A Kubernetes quantity ("1Gi") in bytes, as a decimal string. */}}
{{- define "pantry.bytes" -}}
{{- $n := regexFind "^[0-9]+" . | atoi -}}
{{- $unit := trimPrefix (regexFind "^[0-9]+" .) . -}}
{{- $mult := get (dict "" 1 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824) $unit -}}
{{- mul $n $mult -}}
{{- end -}}

{{/* The headless Service of standby masters: master <i> is
<fullname>-kvstore-master-<i>.<fullname>-kvstore-masters. */}}
{{- define "pantry.masterPeers" -}}
{{- include "pantry.roleName" (dict "ctx" . "role" "kvstore-masters") -}}
{{- end -}}

{{/* The kvstore master as its clients are given it (`--master`, `--kv-master`): HOST:PORT of its
Service, or with standby masters every master by its pod's DNS name, comma-separated. Each master
advertises exactly its own entry, so a standby's "leader is HOST:PORT" names one the clients
have and they follow it at once. A Service IP in front of several masters would not do: it sends
a call to any of them, and a standby refuses it. */}}
{{- define "pantry.masterAddress" -}}
{{- $m := .Values.kvstore.master -}}
{{- $sts := include "pantry.roleName" (dict "ctx" . "role" "kvstore-master") -}}
{{- if $m.standby.enabled -}}
{{- $peers := include "pantry.masterPeers" . -}}
{{- $out := list -}}
{{- range $i := until (int $m.standby.masters) -}}
{{- $out = append $out (printf "%s-%d.%s:%d" $sts $i $peers (int $m.port)) -}}
{{- end -}}
{{- join "," $out -}}
{{- else -}}
{{- printf "%s:%d" $sts (int $m.port) -}}
{{- end -}}
{{- end -}}

{{/* Where a storage node's SSD tier volume is mounted (`--ssd-dir`). */}}
{{- define "pantry.ssdDir" -}}/var/lib/pantry/ssd{{- end -}}

{{/* `--model` of every role. */}}
{{- define "pantry.modelArg" -}}
{{- if eq .Values.model.source "embedded" -}}smollm2{{- else -}}{{ printf "/models/%s" (trimPrefix "/" .Values.model.path) }}{{- end -}}
{{- end -}}

{{/* The model volume (none for the embedded model). */}}
{{- define "pantry.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- end }}
{{- end -}}

{{- define "pantry.modelMount" -}}
{{- if ne .Values.model.source "embedded" }}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}
{{- end -}}

{{/* Env every Pantry container gets: HOME on the writable /tmp, the pod's name and IP, and the
token file with auth.enabled. */}}
{{- define "pantry.env" -}}
- name: HOME
  value: /tmp
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- /* Every kvstore client reads the token from here (the engines have no flag for it); so do
the admin commands run with `kubectl exec` in any Pantry pod. */}}
{{- if .Values.auth.enabled }}
- name: PANTRY_TOKEN_FILE
  value: {{ include "pantry.tokenFile" . }}
{{- end }}
{{- end -}}

{{- define "pantry.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSize }}
{{- end -}}

{{- define "pantry.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* gRPC probes of a role: (dict "port" 7100 "service" "pantry.v1.PrefillEngine"); service ""
probes the server as a whole. The startup probe gives a role loading its model up to 10
minutes; liveness then takes over. */}}
{{- define "pantry.grpcProbes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
    {{- with .service }}
    service: {{ . }}
    {{- end }}
  periodSeconds: 5
  failureThreshold: 120
readinessProbe:
  grpc:
    port: {{ .port }}
    {{- with .service }}
    service: {{ . }}
    {{- end }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
    {{- with .service }}
    service: {{ . }}
    {{- end }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end -}}

{{- define "pantry.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "pantry.roleName" . }}
  labels:
    {{- include "pantry.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .maxUnavailable }}
  selector:
    matchLabels:
      {{- include "pantry.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* nodeSelector, tolerations and affinity of a role: (dict "ctx" $ "role" "prefill" "values"
.Values.prefill "hostNetwork" true). A role on the host network with no affinity of its own gets
a required anti-affinity: two of its pods on one host would collide on their ports. With "spread"
(standby masters) it gets a preferred one: a standby on the leader's host dies with it. */}}
{{- define "pantry.scheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if .values.affinity }}
affinity:
  {{- toYaml .values.affinity | nindent 2 }}
{{- else if .hostNetwork }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "pantry.selectorLabels" . | nindent 12 }}
{{- else if .spread }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "pantry.selectorLabels" . | nindent 14 }}
{{- end }}
{{- end -}}

{{/* The shm transport runs engines and storage nodes in the host's IPC and network namespaces. */}}
{{- define "pantry.shm" -}}
{{- eq .Values.kvstore.transport "shm" -}}
{{- end -}}

{{/* The kvstore master's --metadata: memory, or the Redis it keeps its records in. */}}
{{- define "pantry.metadataArg" -}}
{{- if ne .Values.kvstore.master.metadata "redis" -}}
memory
{{- else if .Values.redis.url -}}
{{ .Values.redis.url }}
{{- else -}}
{{ printf "redis://%s:%d/0" (include "pantry.roleName" (dict "ctx" . "role" "redis")) (int .Values.redis.port) }}
{{- end -}}
{{- end -}}

{{/* The pool's service token (auth.enabled): one Secret, mounted read-only in every Pantry pod. */}}
{{- define "pantry.tokenFile" -}}/var/run/pantry/token{{- end -}}

{{- define "pantry.tokenSecretName" -}}
{{- .Values.auth.existingSecret | default (include "pantry.roleName" (dict "ctx" . "role" "token")) -}}
{{- end -}}

{{/* The token the chart's Secret holds: auth.token, else the one the release's Secret already
has (a token that changed under running pods would lock them out of the pool), else a new one.
Offline (`helm template`, `--dry-run=client`) lookup finds nothing and each render makes a new one. */}}
{{- define "pantry.token" -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace (include "pantry.tokenSecretName" .) -}}
{{- if .Values.auth.token -}}
{{ .Values.auth.token }}
{{- else if and $old $old.data (hasKey $old.data "token") -}}
{{ index $old.data "token" | b64dec }}
{{- else -}}
{{ randAlphaNum 48 }}
{{- end -}}
{{- end -}}

{{- define "pantry.tokenVolume" -}}
{{- if .Values.auth.enabled }}
- name: token
  secret:
    secretName: {{ include "pantry.tokenSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ ternary .Values.auth.existingSecretKey "token" (ne .Values.auth.existingSecret "") }}
        path: token
{{- end }}
{{- end -}}

{{- define "pantry.tokenMount" -}}
{{- if .Values.auth.enabled }}
- name: token
  mountPath: {{ include "pantry.tokenFile" . | dir }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* `--token-file` for every role (master, node, engines, conductor). */}}
{{- define "pantry.tokenArgs" -}}
{{- if .Values.auth.enabled }}
- --token-file
- {{ include "pantry.tokenFile" . }}
{{- end }}
{{- end -}}

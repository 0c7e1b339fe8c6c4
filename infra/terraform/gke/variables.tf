# Inputs of the Cascade GKE cluster. Defaults match params.yaml `kubeflow.pools.*` and the
# base256 profile's stage placements; tests/infra/test_terraform.py keeps them in step.

variable "project_id" {
  description = "Google Cloud project that holds the cluster, the bucket and the service accounts."
  type        = string
}

variable "region" {
  description = "Region of the bucket and of the provider's regional resources."
  type        = string
  default     = "us-central1"
}

variable "zone" {
  description = "Zone of the (zonal) cluster and its node pools: it must offer a3-highgpu-8g (H100) and ct5lp-hightpu-8t (TPU v5e)."
  type        = string
  default     = "us-central1-a"
}

variable "cluster_name" {
  description = "GKE cluster name."
  type        = string
  default     = "cascade"
}

variable "release_channel" {
  description = "GKE release channel: RAPID, REGULAR or STABLE."
  type        = string
  default     = "REGULAR"
}

variable "deletion_protection" {
  description = "Refuse `terraform destroy` of the cluster while true."
  type        = bool
  default     = true
}

# --- cpu-pool: KFP and MLflow system pods, data/validate/features/register, TrainJob launchers.
# e2-standard-16 rather than -8: base256 asks 8 CPUs / 32Gi for data and validate, more than an
# e2-standard-8 node can allocate after GKE's reservations.
variable "cpu_machine_type" {
  description = "Machine type of cpu-pool."
  type        = string
  default     = "e2-standard-16"
}

variable "cpu_min_nodes" {
  type    = number
  default = 1
}

variable "cpu_max_nodes" {
  type    = number
  default = 4
}

# --- gpu-pool: one a3-highgpu-8g = 8 x H100 80GB per node.
variable "gpu_machine_type" {
  description = "Machine type of gpu-pool."
  type        = string
  default     = "a3-highgpu-8g"
}

variable "gpu_accelerator_type" {
  description = "GPU type; GKE labels the nodes cloud.google.com/gke-accelerator=<this> (params kubeflow.pools.gpu.node_selector)."
  type        = string
  default     = "nvidia-h100-80gb"
}

variable "gpu_accelerator_count" {
  description = "GPUs per node (a3-highgpu-8g has 8); at least the largest kubeflow.stages.*.accelerators on the gpu pool."
  type        = number
  default     = 8
}

variable "gpu_min_nodes" {
  type    = number
  default = 0
}

variable "gpu_max_nodes" {
  description = "base256 runs `base` on 4 nodes (a TrainJob)."
  type        = number
  default     = 4
}

variable "gpu_spot" {
  description = "Spot VMs for gpu-pool (cheaper, preemptible: training tasks resume from the checkpoint PVC)."
  type        = bool
  default     = false
}

# --- tpu-pool: TPU v5e single-host slice, 8 chips per node.
variable "tpu_machine_type" {
  description = "Machine type of tpu-pool (a key of local.tpu_machine_types)."
  type        = string
  default     = "ct5lp-hightpu-8t"
}

variable "tpu_min_nodes" {
  type    = number
  default = 0
}

variable "tpu_max_nodes" {
  type    = number
  default = 2
}

# --- storage and identities
variable "bucket_name" {
  description = "GCS bucket for MLflow artifacts (gs://BUCKET/mlflow) and the DVC remote (gs://BUCKET/dvc); globally unique."
  type        = string
}

variable "pipeline_namespace" {
  description = "params.yaml kubeflow.namespace"
  type        = string
  default     = "kubeflow"
}

variable "pipeline_service_account" {
  description = "params.yaml kubeflow.service_account (infra/k8s/pipeline/serviceaccount.yaml)"
  type        = string
  default     = "cascade-pipeline"
}

variable "mlflow_namespace" {
  description = "Namespace of infra/k8s/mlflow"
  type        = string
  default     = "mlflow"
}

variable "mlflow_service_account" {
  description = "Kubernetes ServiceAccount of the MLflow server (infra/k8s/mlflow/serviceaccount.yaml)"
  type        = string
  default     = "mlflow"
}

# GKE Standard cluster for Cascade: three node pools whose names and GKE-applied node labels are
# what params.yaml `kubeflow.pools.*.node_selector` selects, a bucket for MLflow artifacts and the
# DVC remote, and Workload Identity service accounts for the MLflow server and the pipeline pods.
# Not applied in this repository's CI; tests/infra/test_terraform.py checks it against params.yaml.

locals {
  # TPU v5e machine types (single-host slices): GKE labels their nodes with these values.
  tpu_machine_types = {
    "ct5lp-hightpu-1t" = { accelerator = "tpu-v5-lite-podslice", topology = "1x1", chips = 1 }
    "ct5lp-hightpu-4t" = { accelerator = "tpu-v5-lite-podslice", topology = "2x2", chips = 4 }
    "ct5lp-hightpu-8t" = { accelerator = "tpu-v5-lite-podslice", topology = "2x4", chips = 8 }
  }
  tpu = local.tpu_machine_types[var.tpu_machine_type]

  # The labels GKE itself puts on each pool's nodes (users cannot set cloud.google.com/* labels):
  # params.yaml kubeflow.pools.<pool>.node_selector must be a subset of these.
  node_labels = {
    cpu = { "cloud.google.com/gke-nodepool" = "cpu-pool" }
    gpu = {
      "cloud.google.com/gke-nodepool"    = "gpu-pool"
      "cloud.google.com/gke-accelerator" = var.gpu_accelerator_type
    }
    tpu = {
      "cloud.google.com/gke-nodepool"        = "tpu-pool"
      "cloud.google.com/gke-tpu-accelerator" = local.tpu.accelerator
      "cloud.google.com/gke-tpu-topology"    = local.tpu.topology
    }
  }

  workload_pool = "${var.project_id}.svc.id.goog"
}

resource "google_project_service" "apis" {
  for_each = toset([
    "container.googleapis.com",
    "file.googleapis.com", # Filestore, behind the standard-rwx class of the checkpoint PVC
    "storage.googleapis.com",
    "iam.googleapis.com",
  ])
  service            = each.key
  disable_on_destroy = false
}

# --------------------------------------------------------------------------------------------
# Cluster

resource "google_container_cluster" "cascade" {
  name     = var.cluster_name
  location = var.zone # zonal: every pool in the zone that has both H100 and TPU v5e capacity

  # Node pools are managed below; GKE needs a default pool at creation, which is removed.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = var.deletion_protection

  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {}

  release_channel {
    channel = var.release_channel
  }

  workload_identity_config {
    workload_pool = local.workload_pool
  }

  addons_config {
    # standard-rwx StorageClass: the ReadWriteMany checkpoint PVC (infra/k8s/pipeline/pvc.yaml)
    gcp_filestore_csi_driver_config {
      enabled = true
    }
    gce_persistent_disk_csi_driver_config {
      enabled = true
    }
  }

  depends_on = [google_project_service.apis]
}

# Node identity: minimal roles (logs, metrics, pulling images); workloads use Workload Identity.
resource "google_service_account" "nodes" {
  account_id   = "${var.cluster_name}-nodes"
  display_name = "Cascade GKE nodes"
}

resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/monitoring.viewer",
    "roles/stackdriver.resourceMetadata.writer",
    "roles/artifactregistry.reader",
  ])
  project = var.project_id
  role    = each.key
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

# --------------------------------------------------------------------------------------------
# Node pools. Pool names are load-bearing: GKE labels nodes cloud.google.com/gke-nodepool=<name>.

# cpu-pool: KFP, MLflow and PostgreSQL system pods; data, validate, features, register and the
# launchers of multi-node stages (params kubeflow.pools.cpu).
resource "google_container_node_pool" "cpu" {
  name               = "cpu-pool"
  cluster            = google_container_cluster.cascade.id
  location           = var.zone
  initial_node_count = var.cpu_min_nodes

  autoscaling {
    min_node_count = var.cpu_min_nodes
    max_node_count = var.cpu_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.cpu_machine_type
    disk_size_gb    = 200
    disk_type       = "pd-balanced"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = { "cascade.dev/pool" = "cpu" }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

# gpu-pool: 8 x H100 80GB per a3-highgpu-8g node (params kubeflow.pools.gpu). Scales from zero;
# base256's `base` stage spans 4 nodes as a TrainJob.
resource "google_container_node_pool" "gpu" {
  name               = "gpu-pool"
  cluster            = google_container_cluster.cascade.id
  location           = var.zone
  initial_node_count = var.gpu_min_nodes

  autoscaling {
    min_node_count = var.gpu_min_nodes
    max_node_count = var.gpu_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.gpu_machine_type
    disk_size_gb    = 500
    disk_type       = "pd-balanced"
    spot            = var.gpu_spot
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = { "cascade.dev/pool" = "gpu" }

    guest_accelerator {
      type  = var.gpu_accelerator_type
      count = var.gpu_accelerator_count
      # GKE installs the driver (no NVIDIA DaemonSet to apply). The gpu image's torch is a
      # CUDA 13.0 build: it needs a driver of the R580 branch or newer.
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    # a3-highgpu-8g comes with 16 local NVMe SSDs: use them for ephemeral storage (/tmp, caches).
    ephemeral_storage_local_ssd_config {
      local_ssd_count = 16
    }

    gvnic {
      enabled = true
    }

    # GKE adds this taint to GPU nodes by itself; declared so params kubeflow.pools.gpu.tolerations
    # has something to point at.
    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

# tpu-pool: TPU v5e, one single-host 2x4 slice (8 chips) per ct5lp-hightpu-8t node
# (params kubeflow.pools.tpu). No placement_policy: {type = "COMPACT", tpu_topology = ...} is for
# multi-host slices; for a single-host machine type GKE derives the topology from the machine
# type and labels the node cloud.google.com/gke-tpu-topology=2x4 itself.
resource "google_container_node_pool" "tpu" {
  name               = "tpu-pool"
  cluster            = google_container_cluster.cascade.id
  location           = var.zone
  initial_node_count = var.tpu_min_nodes

  autoscaling {
    min_node_count = var.tpu_min_nodes
    max_node_count = var.tpu_max_nodes
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.tpu_machine_type
    disk_size_gb    = 200
    disk_type       = "pd-balanced"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    labels          = { "cascade.dev/pool" = "tpu" }

    # GKE adds this taint to TPU nodes by itself; declared for params kubeflow.pools.tpu.tolerations.
    taint {
      key    = "google.com/tpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }
  }
}

# --------------------------------------------------------------------------------------------
# Object storage: gs://BUCKET/mlflow (MLflow --artifacts-destination) and gs://BUCKET/dvc (DVC remote)

resource "google_storage_bucket" "artifacts" {
  name                        = var.bucket_name
  location                    = upper(var.region)
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  # Old object versions (overwritten artifacts) go after 30 days.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = 30
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

# --------------------------------------------------------------------------------------------
# Workload Identity: Kubernetes ServiceAccount -> Google service account with bucket access.

# MLflow server (infra/k8s/mlflow/serviceaccount.yaml: mlflow/mlflow)
resource "google_service_account" "mlflow" {
  account_id   = "mlflow"
  display_name = "Cascade MLflow tracking server"
}

resource "google_storage_bucket_iam_member" "mlflow" {
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.mlflow.email}"
}

resource "google_service_account_iam_member" "mlflow_workload_identity" {
  service_account_id = google_service_account.mlflow.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.mlflow_namespace}/${var.mlflow_service_account}]"
}

# Pipeline pods (infra/k8s/pipeline/serviceaccount.yaml: kubeflow/cascade-pipeline): DVC pulls and
# pushes, data sources on gs://.
resource "google_service_account" "pipeline" {
  account_id   = var.pipeline_service_account
  display_name = "Cascade Kubeflow pipeline pods"
}

resource "google_storage_bucket_iam_member" "pipeline" {
  bucket = google_storage_bucket.artifacts.name
  role   = "roles/storage.objectAdmin"
  member = "serviceAccount:${google_service_account.pipeline.email}"
}

resource "google_service_account_iam_member" "pipeline_workload_identity" {
  service_account_id = google_service_account.pipeline.name
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${local.workload_pool}[${var.pipeline_namespace}/${var.pipeline_service_account}]"
}

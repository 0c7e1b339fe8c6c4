output "cluster_name" {
  value = google_container_cluster.cascade.name
}

output "get_credentials" {
  description = "Point kubectl at the new cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.cascade.name} --zone ${var.zone} --project ${var.project_id}"
}

output "node_labels" {
  description = "Labels GKE puts on each pool's nodes; params.yaml kubeflow.pools.*.node_selector selects on them."
  value       = local.node_labels
}

output "bucket_url" {
  value = google_storage_bucket.artifacts.url
}

output "mlflow_artifacts_destination" {
  description = "ARTIFACTS_DESTINATION in infra/k8s/mlflow/kustomization.yaml"
  value       = "${google_storage_bucket.artifacts.url}/mlflow"
}

output "dvc_remote_url" {
  description = "dvc remote add -d gcs <this>"
  value       = "${google_storage_bucket.artifacts.url}/dvc"
}

output "mlflow_service_account" {
  description = "iam.gke.io/gcp-service-account of infra/k8s/mlflow/serviceaccount.yaml"
  value       = google_service_account.mlflow.email
}

output "pipeline_service_account" {
  description = "iam.gke.io/gcp-service-account of infra/k8s/pipeline/serviceaccount.yaml"
  value       = google_service_account.pipeline.email
}

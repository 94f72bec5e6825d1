//! The deployment files: docker-compose.yml parses and mounts the config and the data volume
//! where the Dockerfile and the shipped config expect them (no Docker engine here to run it).

use std::path::Path;

use yaml_rust2::YamlLoader;

fn read(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(name),
    )
    .expect(name)
}

#[test]
fn compose_file_parses_and_wires_config_and_data() {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("valid YAML");
    let herald = &docs[0]["services"]["herald"];
    assert_eq!(herald["build"].as_str(), Some("."));
    let volumes: Vec<&str> = herald["volumes"]
        .as_vec()
        .expect("volumes")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        volumes.contains(&"./config/herald.toml:/etc/herald/herald.toml:ro"),
        "{volumes:?}"
    );
    assert!(
        volumes.contains(&"herald-data:/var/lib/herald/data"),
        "{volumes:?}"
    );
    assert!(!docs[0]["volumes"]["herald-data"].is_badvalue());
    let ports: Vec<&str> = herald["ports"]
        .as_vec()
        .expect("ports")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(ports, vec!["1883:1883"]);
    let command: Vec<&str> = herald["command"]
        .as_vec()
        .expect("command")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(
        command,
        vec!["serve", "--config", "/etc/herald/herald.toml"]
    );
}

#[test]
fn dockerfile_runs_serve_in_the_data_volumes_parent() {
    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("WORKDIR /var/lib/herald\n"));
    assert!(dockerfile.contains("cargo build --release --locked --bin herald"));
    // The shipped config keeps data in "data", relative to that working directory.
    assert!(read("config/herald.toml").contains("data_dir = \"data\""));
}

//! Pulls from a real registry (Debian's `docker-registry` with htpasswd auth).

use std::sync::Arc;

use drover_api::job::PullPolicy;
use drover_runner::auth::RegistryAuth;
use drover_runner::pull::PullError;
use drover_runner::{DockerRuntime, ImagePuller, PullLimits};
use drover_tests::{JobDir, Registry, drover_run, tiny_image, unique_name};

fn job_with_credentials(image: &str, password: &str) -> JobDir {
    let j = JobDir::new(&format!(
        "command: echo pulled-and-ran\nenvironment:\n  image: {image}\ndrover:\n  pull_policy: always\n  registry_credentials:\n    username: drover\n    password_file: ./pw\n"
    ));
    j.write("pw", &format!("{password}\n"));
    j
}

#[test]
fn credentials_from_the_job_pull_and_wrong_ones_fail_with_the_registry_reason() {
    let reg = Registry::start();
    let image = reg.push(tiny_image(), "drover/tiny:1");

    let good = job_with_credentials(&image, &reg.password);
    let r = drover_run(&good, &unique_name("regok"), &[]);
    assert_eq!(r.code, Some(0), "stderr: {}", r.stderr);
    assert!(r.stdout.contains("pulled-and-ran"));
    assert!(
        !r.stderr.contains(&reg.password),
        "password leaked: {}",
        r.stderr
    );

    let bad = job_with_credentials(&image, "wrong-password");
    let r = drover_run(&bad, &unique_name("regbad"), &[]);
    assert_eq!(r.code, Some(125), "stderr: {}", r.stderr);
    assert!(
        r.stderr.contains(&format!("pulling {image} failed")) && r.stderr.contains("unauthorized"),
        "expected the registry's 401 reason: {}",
        r.stderr
    );
    assert!(
        !r.stderr.contains("wrong-password"),
        "password leaked: {}",
        r.stderr
    );
}

#[test]
fn a_missing_tag_fails_with_not_found() {
    let reg = Registry::start();
    let image = reg.push(tiny_image(), "drover/tiny:1");
    let missing = image.replace(":1", ":no-such-tag");
    let j = job_with_credentials(&missing, &reg.password);
    let r = drover_run(&j, &unique_name("regmissing"), &[]);
    assert_eq!(r.code, Some(125), "stderr: {}", r.stderr);
    assert!(r.stderr.contains("not found"), "{}", r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_parts_on_one_image_cause_one_pull() {
    let reg = Registry::start();
    let image = reg.push(tiny_image(), "drover/shared:1");
    let before = reg.manifest_gets("drover/shared");
    let runtime = Arc::new(DockerRuntime::connect().await.expect("docker"));
    let puller = ImagePuller::new(runtime, PullLimits::default());
    let auth = || {
        Some(RegistryAuth {
            server: reg.addr.clone(),
            username: reg.user.clone(),
            password: reg.password.clone(),
        })
    };
    let (a, b) = tokio::join!(
        puller.ensure(&image, PullPolicy::Always, auth(), None),
        puller.ensure(&image, PullPolicy::Always, auth(), None),
    );
    a.expect("first part's pull");
    b.expect("second part's pull");
    let pulls = reg.manifest_gets("drover/shared") - before;
    assert_eq!(pulls, 1, "registry log:\n{}", reg.log());

    // A later pull (no longer in flight) does reach the registry again.
    puller
        .ensure(&image, PullPolicy::Always, auth(), None)
        .await
        .expect("third pull");
    assert_eq!(reg.manifest_gets("drover/shared") - before, 2);

    // Control: two pullers that do not share pulls reach the registry twice,
    // so the count above really measures sharing.
    let runtime = Arc::new(DockerRuntime::connect().await.expect("docker"));
    let other = ImagePuller::new(runtime, PullLimits::default());
    let (a, b) = tokio::join!(
        puller.ensure(&image, PullPolicy::Always, auth(), None),
        other.ensure(&image, PullPolicy::Always, auth(), None),
    );
    a.and(b).expect("unshared pulls");
    assert_eq!(reg.manifest_gets("drover/shared") - before, 4);

    // pull_policy never on a missing image is refused without a pull.
    let err = puller
        .ensure(
            &format!("{}/drover/absent:1", reg.addr),
            PullPolicy::Never,
            None,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::NotPresent { .. }), "{err}");
}

# Reference values for profile-likelihood CIs (lme4) and denominator-df tests (lmerTest).
# Run: cd tests/reference && Rscript make_df_extra.R [DATA_DIR]   (DATA_DIR default ../../../shared/data)
# Reads sleepstudy.csv, orthodont_unbal.csv, penicillin.csv from DATA_DIR.
# Writes, into the current directory: df_extra.json, profile_boundary.csv
suppressPackageStartupMessages({
  library(lme4); library(lmerTest); library(pbkrtest); library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
data_dir <- if (length(args) >= 1) args[[1]] else "../../../shared/data"
ctrl <- lmerControl(optimizer = "bobyqa", optCtrl = list(rhoend = 1e-12, maxfun = 1e5))

rd <- function(f) read.csv(file.path(data_dir, f), stringsAsFactors = FALSE)
sleep <- rd("sleepstudy.csv"); sleep$Subject <- factor(sleep$Subject)
sleep$Dcat <- cut(sleep$Days, c(-1, 2, 5, 9), labels = c("a", "b", "c"))
ortho <- rd("orthodont_unbal.csv"); ortho$Subject <- factor(ortho$Subject)
ortho$Sex <- factor(ortho$Sex, levels = c("Male", "Female"))
pen <- rd("penicillin.csv"); pen$plate <- factor(pen$plate); pen$sample <- factor(pen$sample)

## ---------------------------------------------------------------- boundary data set
## y = 1 + x + N(0,1), 10 groups of 5, no group effect; first seed from 1 whose fit is singular.
## Values are rounded to 6 decimals, written, read back, and the fit is made on the data as read.
for (seed in 1:100) {
  set.seed(seed)
  bd <- data.frame(g = sprintf("g%02d", rep(1:10, each = 5)), x = round(rnorm(50), 6))
  bd$y <- round(1 + bd$x + rnorm(50), 6)
  write.csv(bd[, c("y", "x", "g")], "profile_boundary.csv", row.names = FALSE)
  bd <- read.csv("profile_boundary.csv", stringsAsFactors = FALSE); bd$g <- factor(bd$g)
  mb <- lme4::lmer(y ~ x + (1 | g), bd, control = ctrl)
  if (isSingular(mb, tol = 1e-8)) break
}
boundary_seed <- seed

## Exact profile limits by root finding (for comparison with lme4's spline interval): zeta = +-qnorm(0.975)
## on the ML profile (what lme4 profiles, also for REML fits), inner optimisations tight.
exact_ci <- function(form, data) {
  mML <- lme4::lmer(form, data, REML = FALSE, control = ctrl)
  base <- deviance(mML); z <- qnorm(0.975)
  dd <- lme4:::devfun2(mML, useSc = TRUE, signames = FALSE)  # ML deviance of (sd, cor, sigma)
  opt <- attr(dd, "optimum"); nvp <- length(opt) - length(fixef(mML))
  lo <- c(pmax(c(mML@lower, 0), -1), rep(-Inf, length(opt) - nvp))
  up <- c(ifelse(mML@lower == 0, Inf, 1), Inf, rep(Inf, length(opt) - nvp))
  X <- getME(mML, "X"); y <- getME(mML, "y"); se <- sqrt(diag(as.matrix(vcov(mML))))
  re <- paste(sapply(findbars(form), function(b) paste0("(", deparse(b), ")")), collapse = " + ")
  zeta <- function(w, x) {
    if (w <= nvp) {  # minimise dd over the other variance parameters
      f <- function(o) { p <- numeric(nvp); p[w] <- x; p[-w] <- o
                         tryCatch(dd(p), error = function(e) base + 1e6) }
      st <- opt[seq_len(nvp)][-w]
      fv <- if (length(st) == 1) optimize(f, c(max(lo[-w][1], 1e-3 * st), 10 * max(st, 1)), tol = 1e-10)$objective
            else minqa::bobyqa(st, f, lower = lo[seq_len(nvp)][-w], upper = up[seq_len(nvp)][-w],
                               control = list(rhoend = 1e-11, maxfun = 1e5))$fval
    } else {  # ML refit with column j dropped and X[, j] * x as offset
      j <- w - nvp; d <- data; d$.y <- y; d$.off <- X[, j] * x; xs <- character()
      for (k in setdiff(seq_len(ncol(X)), j)) { d[[paste0(".X", k)]] <- X[, k]; xs <- c(xs, paste0(".X", k)) }
      f2 <- as.formula(paste(".y ~ 0", paste(c("", xs), collapse = " + "), "+", re))
      fv <- deviance(suppressMessages(lme4::lmer(f2, d, REML = FALSE, offset = .off, control = ctrl)))
    }
    sign(x - opt[w]) * sqrt(max(0, fv - base))
  }
  root <- function(w, zz) {  # step outward from the estimate, doubling, then uniroot
    a <- opt[w]; s <- sign(zz) * (if (w <= nvp) max(abs(a), 0.05) else se[w - nvp])
    repeat { b <- a + s
      if (b <= lo[w]) { b <- lo[w] + 1e-9; if (zeta(w, b) > zz) return(lo[w]); break }
      if (b >= up[w]) { b <- up[w] - 1e-9; if (zeta(w, b) < zz) return(up[w]); break }
      if (sign(zz) * zeta(w, b) >= abs(zz)) break
      a <- b; s <- 2 * s }
    uniroot(function(x) zeta(w, x) - zz, sort(c(a, b)), tol = 1e-10)$root
  }
  w <- seq_along(opt)
  list(parm = I(names(opt)), lower = sapply(w, function(i) if (opt[i] <= lo[i]) lo[i] else root(i, -z)),
       upper = sapply(w, function(i) root(i, z)))
}
exact_cache <- list()

## ---------------------------------------------------------------- profile CIs
ci_list <- function(ci) list(parm = I(rownames(ci)), lower = unname(ci[, 1]), upper = unname(ci[, 2]))
sdcor_est <- function(m) {  # sd/cor/sigma in profile order and names, then fixed effects
  v <- lme4:::Cv_to_Sv(getME(m, "theta"), n = lengths(m@cnms), s = sigma(m))
  v <- setNames(as.numeric(v), lme4:::profnames(m, signames = FALSE))
  as.list(c(v, fixef(m)))
}
prof_entry <- function(label, data_name, form, data, REML) {
  m <- lme4::lmer(form, data, REML = REML, control = ctrl)
  warns <- character()
  pci <- withCallingHandlers(
    suppressMessages(confint(m, method = "profile", level = 0.95, oldNames = FALSE)),
    warning = function(w) { warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning") })
  wci <- confint(m, method = "Wald", level = 0.95, oldNames = FALSE)
  key <- paste(data_name, deparse(form))
  if (is.null(exact_cache[[key]])) exact_cache[[key]] <<- suppressWarnings(exact_ci(form, data))
  ex <- exact_cache[[key]]
  out <- list(data = data_name, formula = deparse(form), REML = REML,
              estimates = sdcor_est(m), logLik = as.numeric(logLik(m)),
              singular = isSingular(m, tol = 1e-8),
              profile_ci = ci_list(pci), wald_ci = ci_list(wci),
              exact_root_ci = ex, profile_warnings = I(unique(gsub("\\s+", " ", warns))))
  if (REML) {  # lme4 profiles a REML fit on the ML deviance around the ML refit (see note)
    mm <- lme4::lmer(form, data, REML = FALSE, control = ctrl)
    out$ml_refit_estimates <- sdcor_est(mm)
  }
  setNames(list(out), label)
}
f_sleep <- Reaction ~ Days + (Days | Subject)
f_pen <- diameter ~ 1 + (1 | plate) + (1 | sample)
profile <- c(
  prof_entry("sleepstudy_reml", "sleepstudy.csv", f_sleep, sleep, TRUE),
  prof_entry("sleepstudy_ml", "sleepstudy.csv", f_sleep, sleep, FALSE),
  prof_entry("penicillin_reml", "penicillin.csv", f_pen, pen, TRUE),
  prof_entry("penicillin_ml", "penicillin.csv", f_pen, pen, FALSE),
  prof_entry("boundary_reml", "profile_boundary.csv", y ~ x + (1 | g), bd, TRUE),
  prof_entry("boundary_ml", "profile_boundary.csv", y ~ x + (1 | g), bd, FALSE))
profile$boundary_reml$seed <- profile$boundary_ml$seed <- boundary_seed

## ---------------------------------------------------------------- lmerTest
aov_list <- function(a) list(term = I(rownames(a)), SumSq = a[["Sum Sq"]], MeanSq = a[["Mean Sq"]],
                             NumDF = a[["NumDF"]], DenDF = a[["DenDF"]], F = a[["F value"]],
                             p = a[["Pr(>F)"]])
anova_entry <- function(data_name, form, data) {
  m <- lmerTest::lmer(form, data, REML = TRUE, control = ctrl)
  res <- list(data = data_name, formula = deparse(form), REML = TRUE)
  for (ddf in c("Satterthwaite", "Kenward-Roger")) {
    key <- if (ddf == "Satterthwaite") "satterthwaite" else "kenward_roger"
    res[[key]] <- list(type1 = aov_list(anova(m, type = 1, ddf = ddf)),
                       type3 = aov_list(anova(m, type = 3, ddf = ddf)))
  }
  res
}
coef_list <- function(ct) list(term = I(rownames(ct)), estimate = ct[, "Estimate"],
                               se = ct[, "Std. Error"], df = ct[, "df"], t = ct[, "t value"],
                               p = ct[, "Pr(>|t|)"])
mS <- lmerTest::lmer(f_sleep, sleep, REML = FALSE, control = ctrl)
c1 <- contest(mS, L = c(0, 1), rhs = 10, joint = FALSE, ddf = "Satterthwaite")
cF <- contest(mS, L = c(0, 1), rhs = 10, joint = TRUE, ddf = "Satterthwaite")
mB <- lmerTest::lmer(y ~ x + (1 | g), bd, REML = TRUE, control = ctrl)
lmertest <- list(
  boundary_kr = c(list(data = "profile_boundary.csv", formula = "y ~ x + (1 | g)", REML = TRUE,
                       singular = isSingular(mB), ddf = "Kenward-Roger"),
                  coef_list(coef(summary(mB, ddf = "Kenward-Roger")))),
  boundary_sat = c(list(data = "profile_boundary.csv", formula = "y ~ x + (1 | g)", REML = TRUE,
                        singular = isSingular(mB), ddf = "Satterthwaite"),
                   coef_list(coef(summary(mB, ddf = "Satterthwaite")))),
  anova_orthodont = anova_entry("orthodont_unbal.csv", distance ~ age * Sex + (1 | Subject), ortho),
  anova_sleep_dcat = anova_entry("sleepstudy.csv", Reaction ~ Dcat * Days + (1 | Subject), sleep),
  summary_sleep_ml = c(list(data = "sleepstudy.csv", formula = deparse(f_sleep), REML = FALSE,
                            ddf = "Satterthwaite"),
                       coef_list(coef(summary(mS, ddf = "Satterthwaite")))),
  contest_sleep_ml = list(L = c(0, 1), rhs = 10, ddf = "Satterthwaite",
                          t_test = list(estimate = c1[["Estimate"]], se = c1[["Std. Error"]],
                                        df = c1[["df"]], t = c1[["t value"]],
                                        lower = c1[["lower"]], upper = c1[["upper"]],
                                        p = c1[["Pr(>|t|)"]]),
                          F_test = list(SumSq = cF[["Sum Sq"]], MeanSq = cF[["Mean Sq"]],
                                        NumDF = cF[["NumDF"]], DenDF = cF[["DenDF"]],
                                        F = cF[["F value"]], p = cF[["Pr(>F)"]])))

## ---------------------------------------------------------------- write
pv <- function(p) as.character(packageVersion(p))
out <- list(
  meta = list(R = R.version$version.string, lme4 = pv("lme4"), lmerTest = pv("lmerTest"),
              pbkrtest = pv("pbkrtest"), Matrix = pv("Matrix"), jsonlite = pv("jsonlite"),
              script = "tests/reference/make_df_extra.R",
              control = "lmerControl(optimizer='bobyqa', optCtrl=list(rhoend=1e-12, maxfun=1e5)) for every fit"),
  note = list(
    data = paste("CSV columns read as is; Subject, plate, sample, g as factors (R's alphabetical level order);",
                 "orthodont Sex = factor(Sex, levels=c('Male','Female')); sleepstudy gets an added column",
                 "Dcat = cut(Days, c(-1,2,5,9), labels=c('a','b','c')) (Days 0-2 -> a, 3-5 -> b, 6-9 -> c);",
                 "treatment contrasts (R default contr.treatment) everywhere."),
    profile = paste("profile_ci = confint(m, method='profile', level=0.95, oldNames=FALSE) with lme4's",
                    "default profile() settings; wald_ci = confint(m, method='Wald', oldNames=FALSE)",
                    "(null for the variance parameters). Names: sd_<term>|<group>, cor_<t1>.<t2>|<group>, sigma,",
                    "then fixed effects. estimates are those of the fit itself (REML or ML) on the same scale.",
                    "For a REML fit lme4 profiles the ML deviance centred on the ML refit (lme4:::devfun2 calls",
                    "refitML), so REML and ML profile CIs coincide up to optimiser tolerance; ml_refit_estimates",
                    "gives that centre. Wald CIs use the fit's own (REML or ML) vcov.",
                    "exact_root_ci: the same profile limits found by root finding instead of splines: ML fit,",
                    "zeta(x) = sign(x - est) * sqrt(min dev(x, others) - dev(ML fit)); variance parameters via",
                    "lme4:::devfun2 (sd, cor, sigma scale; beta profiled out) minimised by minqa::bobyqa",
                    "(rhoend 1e-11) over the others; fixed effect j via the ML fit of the model without column j",
                    "and offset X[, j] * x; uniroot(tol 1e-10) for zeta = -/+ qnorm(0.975); sd at 0 -> lower 0.",
                    "Identical for the REML and ML entries of a model (lme4 profiles ML in both cases)."),
    boundary = paste("profile_boundary.csv: for seed in 1,2,...: set.seed(seed); x = round(rnorm(50),6);",
                     "y = round(1 + x + rnorm(50),6); g = 10 groups of 5 (g01..g10); first seed whose REML fit",
                     "y ~ x + (1|g) is singular (isSingular tol 1e-8). Profile lower limit of sd_(Intercept)|g is",
                     "the boundary 0 (the profile starts at sd = 0 and confint puts NA -> lower bound).",
                     "boundary_reml: the default-tolerance ML refit inside profile() leaves sd ~ 8e-10, not 0,",
                     "so a few profile rows have zeta = 0, backSpline fails ('non-monotonic profile') and",
                     "confint falls back to LINEAR interpolation of the profile points: its upper sd limit",
                     "(and, through optimiser noise, its fixed-effect limits) differ from boundary_ml, whose",
                     "profile starts at sd = 0 exactly and uses the spline (but its (Intercept) limits are off",
                     "by ~5e-4 relative: the fixed-effect profile's inner bobyqa, default tolerance, starts at",
                     "theta = 0 and stops early). Compare exact_root_ci. profile_warnings lists R's warnings."),
    lmertest = paste("anova_*: lmerTest::lmer REML fit, anova(m, type=1 or 3, ddf='Satterthwaite' or",
                     "'Kenward-Roger'); columns Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F).",
                     "summary_sleep_ml: coef(summary(m, ddf='Satterthwaite')) for the ML fit (REML=FALSE).",
                     "contest_sleep_ml: same ML fit, contest(m, L=c(0,1), rhs=10, joint=FALSE) (t test of",
                     "Days = 10, with 95% CI of the estimate) and joint=TRUE (F test of the same hypothesis).",
                     "lmerTest's type III is invariant to the factor coding (checked: contr.sum gives the same",
                     "tables); covariates are not centred, so type-III Sex is the Sex difference at age = 0 and",
                     "type-III Days (Dcat model) is the unweighted mean of the three Dcat slopes.")),
  profile = profile, lmertest = lmertest)
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, na = "null"), "df_extra.json")
cat("wrote df_extra.json, profile_boundary.csv (boundary seed", boundary_seed, ")\n")
